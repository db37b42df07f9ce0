"""``TokenReducer`` and shared helpers: budget checks, per-frame budget splits, exact top-k, building a ``Reduction``.

Contract for every reducer: exactly ``budget`` tokens out, or the input itself (bit for bit) when budget ≥ N;
``keep_index`` sorted and unique; kept tokens keep their (t, h, w); merged features sit at the position of the token
they merged into; deterministic. All torch, the same code on CPU and GPU."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import InputError
from ..types import Reduction, VisualTokens


class TokenReducer(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[dict]

    def reduce(self, tokens: VisualTokens, budget: int) -> Reduction:
        """Keep ``budget`` of ``tokens`` (see the module contract)."""
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise InputError(f"token budget must be a positive integer, got {budget!r}")
        if budget >= len(tokens):
            return Reduction(tokens.features, torch.arange(len(tokens), device=tokens.features.device), tokens, self.name)
        keep, feats = self._reduce(tokens, budget)
        order = torch.argsort(keep)
        keep, feats = keep[order], feats[order]
        if keep.numel() != budget or (keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all())):
            raise AssertionError(f"{self.name} returned {keep.numel()} tokens (budget {budget}) or duplicates")
        return Reduction(feats, keep, tokens, self.name)

    @abstractmethod
    def _reduce(self, tokens: VisualTokens, budget: int) -> tuple[Tensor, Tensor]:
        """-> (keep_index int64 [budget], features [budget, D]) in any order; called only when budget < N."""


def split_budget(counts: Tensor, budget: int) -> Tensor:
    """int64 [T]: ``budget`` spread over frames in proportion to their token ``counts`` (largest remainder), each at
    most its count, summing exactly to ``budget`` (≤ counts.sum())."""
    counts = counts.to(torch.int64)
    total = int(counts.sum())
    budget = min(budget, total)
    share = counts.double() * budget / max(total, 1)
    out = torch.minimum(torch.floor(share).to(torch.int64), counts)
    rem = budget - int(out.sum())
    if rem > 0:
        # The fractional parts sum to ``rem`` and each is < 1, so at least ``rem`` frames have one; each of those is
        # below its share, hence below its count: one pass of +1 suffices.
        frac = share - out.double()
        out[torch.argsort(-frac, stable=True)[:rem]] += 1
    return out


def topk_per_frame(scores: Tensor, tokens: VisualTokens, per_frame: Tensor) -> Tensor:
    """Indices of the top ``per_frame[t]`` scores within each frame (ties: lower index first), as one tensor.

    Vectorised: one global sort keyed by (frame, -score, index), then a rank within frame."""
    n = scores.shape[0]
    idx = torch.arange(n, device=scores.device)
    # Sort by score descending (stable on index), then stably by frame: ranks within each frame follow.
    order = torch.argsort(-scores.double(), stable=True)
    order = order[torch.argsort(tokens.frame[order], stable=True)]
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64, device=scores.device),
                                     tokens.frame_counts[:-1]]), 0)
    rank = idx - starts[tokens.frame[order]]
    keep = rank < per_frame.to(scores.device)[tokens.frame[order]]
    return order[keep]


def importance(tokens: VisualTokens) -> Tensor:
    """Attention received when the tower provided it; otherwise the feature L2 norm (a common proxy: tokens the
    tower attends to grow in norm)."""
    if tokens.attention is not None:
        return tokens.attention.float()
    return tokens.features.float().norm(dim=-1)


def unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(x)


def prev_same_position(tokens: VisualTokens) -> Tensor:
    """int64 [N]: index of the token at the same (h, w) in the previous frame with the same grid, or -1."""
    n = len(tokens)
    hw = tokens.frame_hw
    counts = hw[:, 0] * hw[:, 1]
    starts = torch.cumsum(torch.cat([counts.new_zeros(1), counts[:-1]]), 0)
    t = tokens.frame
    same = torch.zeros_like(t, dtype=torch.bool)
    same_grid = torch.cat([torch.zeros(1, dtype=torch.bool, device=hw.device), (hw[1:] == hw[:-1]).all(1)])
    same = same_grid[t]
    local = torch.arange(n, device=t.device) - starts[t]
    prev = starts[(t - 1).clamp(min=0)] + local
    return torch.where(same & (t > 0), prev, torch.full_like(prev, -1))


def dpc_knn(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Density-peak clustering scores (DPC-kNN, as PruneVid and FastVID use it) for points x [M, D].

    density ρ_i = exp(−mean squared distance to the k nearest others); δ_i = distance to the nearest denser point
    (the largest distance for the densest). Returns (ρ, δ); centres are the top ρ·δ. Ties in density are broken by
    index (the reference adds random noise instead, which made results depend on the seed)."""
    m = x.shape[0]
    xf = x.float()
    d = torch.cdist(xf, xf)
    kk = max(1, min(k, m - 1))
    if m > 1:
        near = torch.topk(d, kk + 1, largest=False).values[:, 1:]
        rho = torch.exp(-(near**2).mean(1))
    else:
        rho = torch.ones(1, device=x.device)
    # Strict order: ρ, then lower index wins ties, so "denser" is a total order.
    idx = torch.arange(m, device=x.device)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    big = d.max() if m > 1 else torch.tensor(1.0, device=x.device)
    delta = torch.where(denser, d, torch.full_like(d, float("inf"))).min(1).values
    delta = torch.where(torch.isinf(delta), big, delta)
    return rho, delta


def merge_into(features: Tensor, members: Tensor, target: Tensor, into: Tensor, num: int, self_weight: Tensor | None = None):
    """Mean-merge: rows ``members`` of ``features`` join rows ``into`` (indices 0..num-1 into ``target``).

    Returns float [num, D]: mean of each target and its members (``self_weight`` w: w·target + (1 − w)·mean(members)
    for targets with members, when given)."""
    f = features.float()
    sums = torch.zeros(num, f.shape[1], device=f.device).index_add_(0, into, f[members])
    cnt = torch.bincount(into, minlength=num).float()
    if self_weight is None:
        return (f[target] + sums) / (1 + cnt)[:, None]
    mean = sums / cnt.clamp(min=1)[:, None]
    w = self_weight[:, None]
    return torch.where(cnt[:, None] > 0, w * f[target] + (1 - w) * mean, f[target])


def dpc_cluster(x: Tensor, valid: Tensor, want: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Batched DPC-kNN clustering of padded groups: x [S, L, D], valid bool [S, L], want int64 [S] centres per group.

    Returns (is_centre bool [S, L], label int64 [S, L]: the slot of each point's nearest centre; centres label
    themselves). Same scores as ``dpc_knn`` per group; one set of batched ops instead of a loop over groups."""
    s, l, _ = x.shape
    dev = x.device
    xf = x.float()
    d = torch.cdist(xf, xf)
    pair = valid[:, :, None] & valid[:, None, :]
    inf = torch.tensor(float("inf"), device=dev)
    eye = torch.eye(l, dtype=torch.bool, device=dev)[None]
    dn = torch.where(pair & ~eye, d, inf)
    n_valid = valid.sum(1)
    kk = max(1, min(k, l - 1))
    near = torch.topk(dn, kk, dim=2, largest=False).values  # inf where a group has fewer than kk others
    have = torch.clamp(torch.minimum(n_valid - 1, torch.tensor(kk, device=dev)), min=1)
    near = torch.where(torch.isinf(near), torch.zeros_like(near), near)
    rho = torch.exp(-(near**2).sum(2) / have[:, None].float())
    idx = torch.arange(l, device=dev)
    denser = (rho[:, None, :] > rho[:, :, None]) | ((rho[:, None, :] == rho[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    big = torch.where(pair, d, torch.zeros_like(d)).amax((1, 2))
    delta = torch.where(denser & pair, d, inf).min(2).values
    delta = torch.where(torch.isinf(delta), big[:, None].expand_as(delta), delta)
    score = torch.where(valid, rho * delta, torch.full_like(rho, -float("inf")))
    order = torch.argsort(-score.double(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, idx.expand(s, l))
    is_centre = valid & (rank < want[:, None])
    dc = torch.where(is_centre[:, None, :] & valid[:, :, None], d, inf)
    label = torch.argmin(dc, dim=2)
    label = torch.where(is_centre, idx.expand(s, l), label)
    return is_centre, label
