"""``pyramid``: Pyramid Sparse Attention (ziplab PSA) — each block is computed exactly, through pooled K/V, or
skipped, by its rank (or cumulative mass) among the row's blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...registry import PATTERNS
from ..layout import (
    POOL_LEVELS,
    BlockLayout,
    PyramidLayout,
    causal_block_mask,
    causal_row_counts,
    shape_cache,
)
from .base import Pattern, SeqMeta, block_scores, forced_blocks, use_kernel


@PATTERNS.register("pyramid")
@dataclass
class Pyramid(Pattern):
    """Per query block, rank the key blocks by pooled score (``mode="rank"``: by rank over the row's causal blocks;
    ``mode="energy"``: by the pooled-softmax mass of the blocks ranked above) and give each a level by cumulative
    bounds: below ``exact`` → exact keys, below ``pool2`` → keys averaged in pairs, ``pool4`` → fours, ``pool8`` →
    eights, the rest skipped. PSA's defaults (rank mode): top 5% exact, 5–15% 2×, 15–25% 4×, 25–50% 8×. Pooled
    keys carry a logit bias ln p. The ``sink`` and ``local`` (diagonal) blocks, and any block the diagonal or the
    sequence end cuts, are computed exactly when kept at all (pooling across the diagonal would leak the future).
    ``pool_stride``: the block scores pool every ``pool_stride``-th token of each block, as ``block_topk`` (0, the
    default: 8 tokens of each block; 1: the exact mean). 8 against 16 tokens on video q/k (28 heads, H200): the same
    densities, recall within 0.0002, the estimate 0.0666 / 0.0702 ms at 16K (28/28), 0.172 / 0.181 at 32K, 1.562 /
    1.580 at 128K (28/4; BENCHMARKS.md, "… pyramid at 8 tokens")."""

    exact: float = 0.05
    pool2: float = 0.15
    pool4: float = 0.25
    pool8: float = 0.5
    mode: str = "rank"
    sink: int = 1
    local: int = 1
    pool_stride: int = 0
    at_least: ClassVar[dict] = {"pool_stride": 0}

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("rank", "energy"):
            raise ValueError(f"mode must be rank or energy, not {self.mode!r}")
        if not 0 <= self.exact <= self.pool2 <= self.pool4 <= self.pool8 <= 1:
            raise ValueError("bounds must satisfy 0 <= exact <= pool2 <= pool4 <= pool8 <= 1")

    def levels(self, q, k, meta: SeqMeta) -> torch.Tensor:
        """int [B, H, NQ, NK]: 1 (exact), 2, 4, 8 (pooled) or 0 (skipped) per block."""
        return self.levels_from_scores(block_scores(q, k, meta, stride=self.pool_stride), meta, q.shape[2], k.shape[2])

    def levels_from_scores(self, s: torch.Tensor, meta: SeqMeta, nq: int, nk: int) -> torch.Tensor:
        """``levels`` from the pooled block scores ``s`` [B, H, NQ, NK] (``block_scores``), in torch."""
        device = s.device
        nqb, nkb = s.shape[-2:]
        allowed = causal_block_mask(nqb, nkb, meta.block_q, meta.block_k, nq, nk, device) if meta.causal else \
            torch.ones(nqb, nkb, dtype=torch.bool, device=device)
        vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
        if self.mode == "rank":
            pos = torch.arange(nkb, device=device, dtype=torch.float64) / allowed.sum(-1, keepdim=True).clamp(min=1)
        else:
            p = torch.softmax(vals, -1).double()
            pos = p.cumsum(-1) - p  # mass of the blocks ranked above
        lvl_sorted = torch.zeros_like(order)
        for bound, level in reversed(list(zip(self.bounds, (1, *POOL_LEVELS)))):
            lvl_sorted = torch.where(pos < bound, level, lvl_sorted)
        lvl = torch.zeros_like(order).scatter_(-1, order, lvl_sorted) * allowed
        # a block can be pooled when all its keys exist and every query of the row block sees all of them
        m = torch.arange(nqb, device=device)[:, None]
        n = torch.arange(nkb, device=device)[None, :]
        poolable = (n + 1) * meta.block_k <= nk
        if meta.causal:
            poolable = poolable & ((n + 1) * meta.block_k - 1 <= m * meta.block_q + (nk - nq))
        forced = forced_blocks(nqb, nkb, meta, nq, nk, self.sink, self.local, device) & allowed
        lvl = torch.where(((lvl > 1) & ~poolable) | forced, 1, lvl)
        return lvl

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return self.exact, self.pool2, self.pool4, self.pool8

    def estimate(self, q, k, meta: SeqMeta, backend: str = "auto") -> PyramidLayout:
        """``backend``: "kernel" (rank mode: ``kernels.block_select.select_levels`` ranks and compacts every row in
        one Triton program; the default on CUDA) or "reference" (torch: a sort of every row); both give the same
        layout. The kernel skips blocks past the causal diagonal itself, so its scores skip ``block_scores``'s
        causal ``masked_fill`` (a pass over the scores and the causal mask's host work)."""
        kernel = self.mode == "rank" and use_kernel(backend, q)
        s = block_scores(q, k, meta, masked=not kernel, backend=backend, stride=self.pool_stride)
        return self.layout_from_scores(s, meta, q.shape[2], k.shape[2], backend)

    def layout_from_scores(self, s: torch.Tensor, meta: SeqMeta, nq: int, nk: int,
                           backend: str = "auto") -> PyramidLayout:
        """The layout from pooled block scores ``s`` [B, H, NQ, NK]: causally masked (``block_scores``' default)
        for the torch path and energy mode; the rank-mode kernel ignores what lies past the diagonal, masked or
        not."""
        if self.mode == "rank" and use_kernel(backend, s):
            from ..kernels.block_select import select_levels

            ranks, widths = _rank_bounds(s.shape[-2], s.shape[-1], meta.block_q, meta.block_k, nq, nk, meta.causal,
                                         self.bounds, self.sink, self.local, s.device)
            parts = select_levels(s, ranks, widths, self.sink, self.local, meta.block_q, meta.block_k, nq, nk,
                                  meta.causal)
            make = lambda part: BlockLayout(*part, meta.block_q, meta.block_k, nq, nk, meta.causal)
            return PyramidLayout(make(parts[0]), tuple(make(x) for x in parts[1:]))
        lvl = self.levels_from_scores(s, meta, nq, nk)
        make = lambda m: BlockLayout.from_block_mask(m, meta.block_q, meta.block_k, nq, nk, meta.causal,
                                                     width=m.shape[-1])
        return PyramidLayout(make(lvl == 1), tuple(make(lvl == p) for p in POOL_LEVELS))


@shape_cache()
def _rank_bounds(nqb: int, nkb: int, block_q: int, block_k: int, nq: int, nk: int, causal: bool,
                 bounds: tuple[float, ...], sink: int, local: int, device):
    """Per query block, how many of its best-ranked blocks reach each level (rank r reaches a level when
    r / (the row's causal blocks) < its bound, in float64 as the torch path computes it), as int32 [NQ, 4] on
    ``device``, and a width that bounds each level's count in every row (exact: plus forced and unpoolable blocks).
    Shape-only: computed on the host, once per shape and device."""
    count = np.array(causal_row_counts(nqb, nkb, block_q, block_k, nq, nk)) if causal else np.full(nqb, nkb)
    pos = np.arange(nkb, dtype=np.float64)[None, :] / np.maximum(count, 1)[:, None]
    ranks = np.stack([(pos < b).sum(-1) for b in bounds], -1).astype(np.int32)
    ranks = np.minimum(ranks, count[:, None])
    spread = -(-block_q // block_k) + 2  # blocks a row block's diagonal (or the sequence end) cuts: not poolable
    widths = (int(ranks[:, 0].max(initial=0)) + sink + local + spread, int((ranks[:, 1] - ranks[:, 0]).max(initial=0)),
              int((ranks[:, 2] - ranks[:, 1]).max(initial=0)), int((ranks[:, 3] - ranks[:, 2]).max(initial=0)))
    return torch.from_numpy(ranks).to(device), widths
