"""``ts_llava``: TS-LLaVA (tingyu215/TS-LLaVA) at the token level. A thumbnail of ``thumb_frames`` (6) uniformly chosen
frames laid out as one grid image: each chosen frame is average-pooled to its cell of the grid (rows × cols as close
to square as the count allows), the cell's pooled tokens sitting at that frame's tokens; the rest of the budget is
tokens sampled uniformly (rounded linspace) from all frames' remaining tokens.

Fixes to the reference (METHODS.md §6): frame indices round halves up (torch.round's half-to-even picked [0, 2, 5] of
10 for N = 6), and the grid shape is chosen by divisors with a fallback to a ragged last row, so a prime count of
images no longer gives a 95×96 grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) with rows·cols ≥ n, as square as possible."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def uniform_pick(total: int, n: int) -> torch.Tensor:
    """floor(linspace(0, total-1, n) + 0.5): evenly spread, halves rounded up."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if n == 1:
        return torch.tensor([(total - 1) // 2])
    return torch.floor(torch.linspace(0, total - 1, n, dtype=torch.float64) + 0.5).long()


@TOKENS.register("ts_llava")
@dataclass
class TSLLaVA(TokenReducer):
    thumb_frames: int = 6
    thumb_share: float = 0.5  # fraction of the budget spent on the thumbnail

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        t = tokens.num_frames
        k = min(self.thumb_frames, t)
        rows, cols = grid_shape(k)
        chosen = uniform_pick(t, k).to(dev)
        thumb_budget = min(int(budget * self.thumb_share), budget)
        per_cell = thumb_budget // k if k else 0
        feats = tokens.features.float().clone()
        keep_parts = []
        slices = tokens.frame_slices()
        for f in chosen.tolist() if per_cell > 0 else []:
            h, w = tokens.frame_hw[f].tolist()
            # The cell of a (rows x cols) thumbnail holds about per_cell tokens: pool the frame's grid to that size.
            ch = max(1, min(h, round(math.sqrt(per_cell * h / max(w, 1)))))
            cw = max(1, min(w, per_cell // ch))
            a, _ = slices[f]
            grid = feats[a : a + h * w].view(h, w, -1).permute(2, 0, 1)[None]
            pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (ch, cw))[0].permute(1, 2, 0).reshape(ch * cw, -1)
            # Each pooled cell sits at the token nearest its centre.
            ys = torch.clamp(((torch.arange(ch, device=dev) + 0.5) * h / ch).long(), max=h - 1)
            xs = torch.clamp(((torch.arange(cw, device=dev) + 0.5) * w / cw).long(), max=w - 1)
            at = a + (ys[:, None] * w + xs[None, :]).reshape(-1)
            feats[at] = pooled
            keep_parts.append(at)
        thumb = torch.cat(keep_parts) if keep_parts else torch.zeros(0, dtype=torch.int64, device=dev)
        left = budget - thumb.numel()
        free = torch.ones(len(tokens), dtype=torch.bool, device=dev)
        free[thumb] = False
        pool = torch.nonzero(free).flatten()
        sample = pool[uniform_pick(pool.numel(), left).to(dev)]
        keep = torch.cat([thumb, sample])
        return keep, feats[keep].to(tokens.features.dtype)
