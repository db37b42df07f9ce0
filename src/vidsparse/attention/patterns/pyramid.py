"""``pyramid``: Pyramid Sparse Attention (ziplab PSA) — each block is computed exactly, through pooled K/V, or
skipped, by its rank (or cumulative mass) among the row's blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import POOL_LEVELS, BlockLayout, PyramidLayout, causal_block_mask
from .base import Pattern, SeqMeta, block_scores, forced_blocks


@PATTERNS.register("pyramid")
@dataclass
class Pyramid(Pattern):
    """Per query block, rank the key blocks by pooled score (``mode="rank"``: by rank over the row's causal blocks;
    ``mode="energy"``: by the pooled-softmax mass of the blocks ranked above) and give each a level by cumulative
    bounds: below ``exact`` → exact keys, below ``pool2`` → keys averaged in pairs, ``pool4`` → fours, ``pool8`` →
    eights, the rest skipped. PSA's defaults (rank mode): top 5% exact, 5–15% 2×, 15–25% 4×, 25–50% 8×. Pooled
    keys carry a logit bias ln p. The ``sink`` and ``local`` (diagonal) blocks, and any block the diagonal or the
    sequence end cuts, are computed exactly when kept at all (pooling across the diagonal would leak the future)."""

    exact: float = 0.05
    pool2: float = 0.15
    pool4: float = 0.25
    pool8: float = 0.5
    mode: str = "rank"
    sink: int = 1
    local: int = 1

    def __post_init__(self):
        if self.mode not in ("rank", "energy"):
            raise ValueError(f"mode must be rank or energy, not {self.mode!r}")
        if not 0 <= self.exact <= self.pool2 <= self.pool4 <= self.pool8 <= 1:
            raise ValueError("bounds must satisfy 0 <= exact <= pool2 <= pool4 <= pool8 <= 1")

    def levels(self, q, k, meta: SeqMeta) -> torch.Tensor:
        """int [B, H, NQ, NK]: 1 (exact), 2, 4, 8 (pooled) or 0 (skipped) per block."""
        nq, nk = q.shape[2], k.shape[2]
        s = block_scores(q, k, meta)
        nqb, nkb = s.shape[-2:]
        allowed = causal_block_mask(nqb, nkb, meta.block_q, meta.block_k, nq, nk, q.device) if meta.causal else \
            torch.ones(nqb, nkb, dtype=torch.bool, device=q.device)
        vals, order = torch.sort(s, dim=-1, descending=True)
        if self.mode == "rank":
            pos = torch.arange(nkb, device=q.device, dtype=torch.float64) / allowed.sum(-1, keepdim=True).clamp(min=1)
        else:
            p = torch.softmax(vals, -1).double()
            pos = p.cumsum(-1) - p  # mass of the blocks ranked above
        lvl_sorted = torch.zeros_like(order)
        for bound, level in reversed(list(zip((self.exact, self.pool2, self.pool4, self.pool8), (1, *POOL_LEVELS)))):
            lvl_sorted = torch.where(pos < bound, level, lvl_sorted)
        lvl = torch.zeros_like(order).scatter_(-1, order, lvl_sorted) * allowed
        # a block can be pooled when all its keys exist and every query of the row block sees all of them
        m = torch.arange(nqb, device=q.device)[:, None]
        n = torch.arange(nkb, device=q.device)[None, :]
        poolable = (n + 1) * meta.block_k <= nk
        if meta.causal:
            poolable = poolable & ((n + 1) * meta.block_k - 1 <= m * meta.block_q + (nk - nq))
        forced = forced_blocks(nqb, nkb, meta, nq, nk, self.sink, self.local, q.device) & allowed
        lvl = torch.where(((lvl > 1) & ~poolable) | forced, 1, lvl)
        return lvl

    def estimate(self, q, k, meta: SeqMeta) -> PyramidLayout:
        lvl = self.levels(q, k, meta)
        nq, nk = q.shape[2], k.shape[2]
        make = lambda m: BlockLayout.from_block_mask(m, meta.block_q, meta.block_k, nq, nk, meta.causal)  # noqa: E731
        return PyramidLayout(make(lvl == 1), tuple(make(lvl == p) for p in POOL_LEVELS))
