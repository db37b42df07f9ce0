"""``pooling``: 2×2 spatial average pooling per frame (LLaVA-Video style), the baseline.

Each window's mean sits at its top-left token. A budget below the window count keeps windows spread evenly over the
video (rounded linspace); a budget above it un-pools windows, spread evenly, back into their tokens — the last one
partly, its mean then covering the tokens not kept on their own — so exactly ``budget`` tokens come out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer


def windows(tokens, size: int = 2):
    """int64 [N]: window id of every token (windows of size×size per frame, ragged at the edges), and the number."""
    pos = tokens.positions
    hw = tokens.frame_hw
    wh = (hw[:, 0] + size - 1) // size
    ww = (hw[:, 1] + size - 1) // size
    per = wh * ww
    first = torch.cumsum(torch.cat([per.new_zeros(1), per[:-1]]), 0)
    t = pos[:, 0]
    wid = first[t] + (pos[:, 1] // size) * ww[t] + pos[:, 2] // size
    return wid, int(per.sum())


@TOKENS.register("pooling")
@dataclass
class Pooling(TokenReducer):
    size: int = 2

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        n = len(tokens)
        wid, nw = windows(tokens, self.size)
        count = torch.bincount(wid, minlength=nw)
        rep = torch.full((nw,), n, dtype=torch.int64, device=dev).scatter_reduce(
            0, wid, torch.arange(n, device=dev), reduce="amin")
        feats = tokens.features.float()
        if budget <= nw:
            pick = torch.round(torch.linspace(0, nw - 1, budget, device=dev)).long() if budget > 1 else \
                torch.tensor([(nw - 1) // 2], device=dev)
            sums = torch.zeros(nw, feats.shape[1], device=dev).index_add_(0, wid, feats)
            mean = sums / count[:, None]
            return rep[pick], mean[pick].to(tokens.features.dtype)
        # Un-pool windows in an evenly spread order until the budget is met.
        extra = budget - nw
        order = _spread_order(nw, dev)
        gain = (count[order] - 1).cumsum(0)
        full = order[gain <= extra]
        left = extra - (int(gain[gain <= extra][-1]) if bool((gain <= extra).any()) else 0)
        solo = torch.zeros(n, dtype=torch.bool, device=dev)  # tokens kept on their own (not in a window mean)
        solo |= torch.isin(wid, full)
        if left > 0:
            part = order[int((gain <= extra).sum())]
            members = torch.nonzero(wid == part).flatten()
            solo[members[1 : 1 + left]] = True  # the window's first token stays its mean's representative
        is_rep = torch.zeros(n, dtype=torch.bool, device=dev)
        is_rep[rep] = True
        pooled = ~solo  # tokens averaged into their window's representative
        sums = torch.zeros(nw, feats.shape[1], device=dev).index_add_(0, wid[pooled], feats[pooled])
        cnt = torch.bincount(wid[pooled], minlength=nw)
        out = feats.clone()
        has = cnt > 0
        out[rep[has]] = sums[has] / cnt[has][:, None]
        keep = solo | (is_rep & has[wid])
        idx = torch.nonzero(keep).flatten()
        return idx, out[idx].to(tokens.features.dtype)


def _spread_order(n: int, device) -> torch.Tensor:
    """A permutation of range(n) that spreads evenly at every prefix (golden-ratio sequence)."""
    phi = (5 ** 0.5 - 1) / 2
    return torch.argsort(torch.frac(torch.arange(n, device=device, dtype=torch.float64) * phi), stable=True)
