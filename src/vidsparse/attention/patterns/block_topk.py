"""``block_topk``: top key blocks by pooled block scores."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout, causal_block_mask, shape_cache
from .base import Pattern, SeqMeta, block_scores, pool_blocks, pool_stride, row_totals, topk_layout, use_kernel


@PATTERNS.register("block_topk")
@dataclass
class BlockTopK(Pattern):
    """Top blocks by pooled score per query block: ``topk`` blocks per row, or when 0, ``density`` × the row's causal
    blocks (rounded up). The diagonal (``local`` blocks) and ``sink`` blocks are always kept and count towards that
    budget. Softmax is monotone, so the raw pooled logits rank the blocks; one ``topk`` builds the layout.
    ``pool_stride``: pool every ``pool_stride``-th token of each block (``base.pool_blocks``), reading that fraction
    of q and k; 1 is the exact block mean; 0 (the default) pools ``POOL_SAMPLES`` = 8 tokens of each block (stride 16
    for 128-token blocks). On video q/k at 16K–128K tokens on an H200 that keeps the recall of 16 tokens within
    0.0005 and of the exact means within 0.0013, and the estimate takes 0.0217 / 0.0264 / 0.0817 ms at 16K and 5%
    for 8 / 16 tokens / the exact means (BENCHMARKS.md, "… video q/k, pool stride, block_topk's 8-token default").
    ``backend``: "auto" (the Triton pooled scores and selection on CUDA, torch elsewhere), "kernel" or "reference"
    (torch)."""

    topk: int = 0
    density: float = 0.1
    sink: int = 1
    local: int = 1
    pool_stride: int = 0
    backend: str = "auto"
    at_least: ClassVar[dict] = {"topk": 0, "pool_stride": 0}
    fractions: ClassVar[tuple] = ("density",)

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        """On CUDA (``backend`` "auto" or "kernel") and up to ``kernels.pooled_topk.UP_TO`` key blocks, q's pooling,
        the scores and the selection run in one kernel (``kernels.pooled_topk``) after k's pooling, which on
        Hopper and newer it overlaps (programmatic dependent launch); ``VIDSPARSE_TOPK_KEYS`` "kernel" pools the
        keys in the same Triton kernel without the overlap, "torch" with ``pool_blocks``. ``VIDSPARSE_TOPK_FUSED=0``
        keeps the scores and the selection apart (the same layout where the fp32 sums are exact)."""
        nq, nk = q.shape[2], k.shape[2]
        nqb, nkb = -(-nq // meta.block_q), -(-nk // meta.block_k)
        width = max(1, min(max(self.topk if self.topk > 0 else math.ceil(nkb * self.density), self.sink + self.local),
                           nkb))
        total = _totals(nqb, nkb, meta.block_q, meta.block_k, meta.causal, nq, nk, self.topk, self.density, self.sink,
                        self.local, width, q.device)
        if use_kernel(self.backend, q) and os.environ.get("VIDSPARSE_TOPK_FUSED") != "0":
            from ..kernels import fit
            from ..kernels.pooled_topk import fits, pooled_topk

            if fits(nkb, q.shape[-1]):
                keys = fit.env_choice("VIDSPARSE_TOPK_KEYS", "pdl", ("pdl", "kernel", "torch"))
                qs, ks = (pool_stride(self.pool_stride, block) for block in (meta.block_q, meta.block_k))
                kp = pool_blocks(k, meta.block_k, stride=ks) if keys == "torch" else None
                index, count, full = pooled_topk(q, k, total, width, self.sink, self.local, meta.block_q,
                                                 meta.block_k, meta.causal, qs, ks, kp=kp,
                                                 pdl=None if keys == "pdl" else False)
                return BlockLayout(index, count, full, meta.block_q, meta.block_k, nq, nk, meta.causal)
        s = block_scores(q, k, meta, masked=False, backend=self.backend, stride=self.pool_stride)
        return topk_layout(s, None, width, q, k, meta, self.sink, self.local, backend=self.backend, total=total)


@shape_cache()
def _totals(nqb, nkb, block_q, block_k, causal, nq, nk, topk, density, sink, local, width, device):
    """Blocks per row (shape-only, ``shape_cache``): ``topk``, or ``density`` × the row's causal blocks rounded up
    (float64, as the host-side width), through ``row_totals``; int32, as the selection kernel reads them (an int64
    copy would be converted in every layer's call)."""
    if topk > 0:
        budget = torch.full((nqb,), topk, device=device)
    else:
        rows = causal_block_mask(nqb, nkb, block_q, block_k, nq, nk, device).sum(-1) if causal else \
            torch.full((nqb,), nkb, device=device)
        budget = torch.ceil(rows.double() * density).long()
    return row_totals(budget, width, nqb, nkb, SeqMeta(block_q, block_k, causal), nq, nk, sink, local,
                      device).to(torch.int32)
