"""``block_topk``: top key blocks by pooled block scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout, causal_block_mask, shape_cache
from .base import Pattern, SeqMeta, block_scores, check_backend, row_totals, topk_layout, use_kernel


@PATTERNS.register("block_topk")
@dataclass
class BlockTopK(Pattern):
    """Top blocks by pooled score per query block: ``topk`` blocks per row, or when 0, ``density`` × the row's causal
    blocks (rounded up). The diagonal (``local`` blocks) and ``sink`` blocks are always kept and count towards that
    budget. Softmax is monotone, so the raw pooled logits rank the blocks; one ``topk`` builds the layout.
    ``backend``: "kernel" (``kernels.block_select.select_pooled``: pooling of the queries, the pooled scores and the
    selection in one Triton kernel; the default on CUDA) or "reference" (torch: ``block_scores``, ``topk_layout``);
    both keep the same blocks up to the order in which the pooled products are summed."""

    topk: int = 0
    density: float = 0.1
    sink: int = 1
    local: int = 1
    backend: str = "auto"

    def __post_init__(self):
        check_backend(self.backend)

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        nq, nk = q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // meta.block_q), -(-nk // meta.block_k)
        width = max(1, min(max(self.topk if self.topk > 0 else math.ceil(nkb * self.density), self.sink + self.local),
                           nkb))
        total = _totals(nqb, nkb, meta.block_q, meta.block_k, meta.causal, nq, nk, self.topk, self.density, self.sink,
                        self.local, width, q.device)
        if use_kernel(self.backend, q):
            from ..kernels.block_select import select_pooled

            index = select_pooled(q, k, total, width, self.sink, self.local, meta.block_q, meta.block_k, meta.causal)
            return BlockLayout.from_index(index, total.expand(*index.shape[:-1]), meta.block_q, meta.block_k, nq, nk,
                                          meta.causal)
        s = block_scores(q, k, meta, masked=False)
        return topk_layout(s, None, width, q, k, meta, self.sink, self.local, total=total)


@shape_cache()
def _totals(nqb, nkb, block_q, block_k, causal, nq, nk, topk, density, sink, local, width, device):
    """Blocks per row (shape-only, ``shape_cache``): ``topk``, or ``density`` × the row's causal blocks rounded up
    (float64, as the host-side width), through ``row_totals``."""
    if topk > 0:
        budget = torch.full((nqb,), topk, device=device)
    else:
        rows = causal_block_mask(nqb, nkb, block_q, block_k, nq, nk, device).sum(-1) if causal else \
            torch.full((nqb,), nkb, device=device)
        budget = torch.ceil(rows.double() * density).long()
    return row_totals(budget, width, nqb, nkb, SeqMeta(block_q, block_k, causal), nq, nk, sink, local, device)
