"""``dense``: every causal block; through the kernel it must equal SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta


@PATTERNS.register("dense", static=True)
@dataclass
class Dense(Pattern):
    """Every causal block (every block when non-causal). Executed by the kernel it must equal SDPA."""

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        nq, nk, nqb, nkb = self.grid(q, k, meta)
        return BlockLayout.from_block_mask(torch.ones(nqb, nkb, dtype=torch.bool, device=q.device), meta.block_q,
                                           meta.block_k, nq, nk, meta.causal, width=nkb)
