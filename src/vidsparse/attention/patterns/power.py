"""``power``: PowerAttention's static power-of-two block pattern."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta, forced_blocks


@PATTERNS.register("power", static=True)
@dataclass
class Power(Pattern):
    """PowerAttention: query block m reads key blocks m − 2^i (i ≥ 0) plus ``local`` blocks and ``sink`` blocks,
    so any token reaches any earlier one in O(log N) layers at O(N log N) cost."""

    local: int = 2
    sink: int = 1

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        nq, nk, nqb, nkb = self.grid(q, k, meta)
        base = forced_blocks(nqb, nkb, meta, nq, nk, self.sink, self.local, q.device)
        m = torch.arange(nqb, device=q.device)[:, None] * meta.block_q // meta.block_k
        n = torch.arange(nkb, device=q.device)[None, :]
        dist = m - n
        pow2 = (dist > 0) & ((dist & (dist - 1)) == 0)
        # at most the sink, the local blocks and one block per power of two below the row's diagonal
        return BlockLayout.from_block_mask(base | pow2, meta.block_q, meta.block_k, nq, nk, meta.causal,
                                           width=self.sink + self.local + nkb.bit_length())
