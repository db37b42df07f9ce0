"""``block_topk``: top key blocks by pooled block scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout, causal_block_mask
from .base import Pattern, SeqMeta, keep_topk, pooled_block_probs, finish_layout


@PATTERNS.register("block_topk")
@dataclass
class BlockTopK(Pattern):
    """Top blocks by pooled score per query block: ``topk`` blocks, or when 0, ``density`` × the row's causal
    blocks (rounded up). The diagonal (``local`` blocks) and ``sink`` blocks are always kept."""

    topk: int = 0
    density: float = 0.1
    sink: int = 1
    local: int = 1

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        p = pooled_block_probs(q, k, meta)
        if self.topk > 0:
            keep = keep_topk(p, self.topk)
        else:
            nqb, nkb = p.shape[-2:]
            allowed = causal_block_mask(nqb, nkb, meta.block_q, meta.block_k, q.shape[2], k.shape[2], q.device)
            per_row = torch.ceil(allowed.sum(-1).float() * self.density).long() if meta.causal else \
                torch.full((nqb,), math.ceil(nkb * self.density), device=q.device)
            keep = keep_topk(p, per_row)
        return finish_layout(keep, q, k, meta, self.sink, self.local)
