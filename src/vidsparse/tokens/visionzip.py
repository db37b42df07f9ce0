"""``visionzip``: VisionZip (dvlab-research/VisionZip), per frame. Dominant tokens: the top by attention received
(CLS attention where the tower has a CLS, mean received attention otherwise; without attention, the feature norm).
Contextual tokens: from the rest, C targets at a uniform stride; every other remaining token joins the target of
highest key cosine (the tower's keys when given, else the features); each contextual token = target + mean(assigned),
as the reference code computes it. Defaults D = 54, C = 10 per frame; a token budget is split over frames in
proportion to their tokens and, within a frame, between dominant and contextual in the ratio D : C."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, importance, split_budget, topk_per_frame, unit


@TOKENS.register("visionzip")
@dataclass
class VisionZip(TokenReducer):
    dominant: int = 54
    contextual: int = 10

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        counts = tokens.frame_counts
        per = split_budget(counts, budget)
        n_ctx = torch.clamp(torch.round(per.double() * self.contextual / (self.dominant + self.contextual)).long(),
                            min=0)
        n_ctx = torch.minimum(n_ctx, torch.clamp(counts - (per - n_ctx), min=0))  # targets must exist
        n_dom = per - n_ctx
        score = importance(tokens)
        dom = topk_per_frame(score, tokens, n_dom)
        is_dom = torch.zeros(len(tokens), dtype=torch.bool, device=dev)
        is_dom[dom] = True
        # Targets: per frame, n_ctx[t] of the remaining tokens at a uniform stride (in raster order).
        rest = torch.nonzero(~is_dom).flatten()
        rest_frame = tokens.frame[rest]
        rest_count = torch.bincount(rest_frame, minlength=tokens.num_frames)
        rest_start = torch.cumsum(torch.cat([rest_count.new_zeros(1), rest_count[:-1]]), 0)
        local = torch.arange(rest.numel(), device=dev) - rest_start[rest_frame]
        stride = torch.clamp(rest_count // torch.clamp(n_ctx, min=1), min=1)
        is_target = (local % stride[rest_frame] == 0) & (local // stride[rest_frame] < n_ctx[rest_frame])
        targets = rest[is_target]
        others = rest[~is_target]
        feats = tokens.features.float().clone()
        if targets.numel() and others.numel():
            key = unit(tokens.keys if tokens.keys is not None else tokens.features)
            sim = key[others] @ key[targets].T
            same_frame = tokens.frame[others][:, None] == tokens.frame[targets][None, :]
            sim = sim.masked_fill(~same_frame, float("-inf"))
            best = torch.argmax(sim, dim=1)
            ok = torch.isfinite(sim.gather(1, best[:, None]).squeeze(1))  # a frame with no target drops its rest
            sums = torch.zeros(targets.numel(), feats.shape[1], device=dev).index_add_(0, best[ok], feats[others[ok]])
            cnt = torch.bincount(best[ok], minlength=targets.numel())
            merged = feats[targets] + torch.where(cnt[:, None] > 0, sums / cnt.clamp(min=1)[:, None], 0.0)
            feats[targets] = merged
        keep = torch.cat([dom, targets])
        return keep, feats[keep].to(tokens.features.dtype)
