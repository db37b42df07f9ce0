"""``block_topk``: top key blocks by pooled block scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout, causal_block_mask
from .base import Pattern, SeqMeta, block_scores, topk_layout


@PATTERNS.register("block_topk")
@dataclass
class BlockTopK(Pattern):
    """Top blocks by pooled score per query block: ``topk`` blocks per row, or when 0, ``density`` × the row's causal
    blocks (rounded up). The diagonal (``local`` blocks) and ``sink`` blocks are always kept and count towards that
    budget. Softmax is monotone, so the raw pooled logits rank the blocks; one ``topk`` builds the layout."""

    topk: int = 0
    density: float = 0.1
    sink: int = 1
    local: int = 1

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        s = block_scores(q, k, meta, masked=False)
        nqb, nkb = s.shape[-2:]
        if self.topk > 0:
            budget = torch.full((nqb,), self.topk, device=q.device)
            width = self.topk
        else:
            rows = causal_block_mask(nqb, nkb, meta.block_q, meta.block_k, q.shape[2], k.shape[2], q.device).sum(-1) \
                if meta.causal else torch.full((nqb,), nkb, device=q.device)
            budget = torch.ceil(rows.double() * self.density).long()  # float64, as the host bound below
            width = math.ceil(nkb * self.density)
        return topk_layout(s, budget, max(width, self.sink + self.local), q, k, meta, self.sink, self.local)
