"""``sink_window``: StreamingLLM's A-shape (attention sinks plus a local window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta, forced_blocks


@PATTERNS.register("sink_window", static=True)
@dataclass
class SinkWindow(Pattern):
    """The first ``sink`` key blocks plus the ``window`` blocks ending at the diagonal."""

    sink: int = 1
    window: int = 4
    at_least: ClassVar[dict] = {"window": 1}

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        nq, nk, nqb, nkb = self.grid(q, k, meta)
        m = forced_blocks(nqb, nkb, meta, nq, nk, self.sink, self.window, q.device)
        return BlockLayout.from_block_mask(m, meta.block_q, meta.block_k, nq, nk, meta.causal,
                                           width=self.sink + self.window)
