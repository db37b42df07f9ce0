"""``ktv_tokens``: KTV stage 2 (hktk07/KTV). Per token, score = α·minmax(importance) + (1 − α)·(1 − minmax(mean cosine
to the other tokens of its frame)), α = 0.2; the top tokens are kept in original order. Importance is the attention
received (KTV uses the CLS→patch pre-softmax q·k; pass it as ``attention``); without it, the feature norm. The budget
is split over frames in proportion to their tokens (KTV's frame stage sets per-frame budgets; an even split stands in
when none is given)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, importance, minmax, split_budget, topk_per_frame, unit


@TOKENS.register("ktv_tokens")
@dataclass
class KTVTokens(TokenReducer):
    alpha: float = 0.2

    def _reduce(self, tokens, budget):
        f = unit(tokens.features)
        # Mean cosine to the other tokens of the frame: (f · Σ_frame f − 1) / (n − 1), no N×N matrix needed.
        sums = torch.zeros(tokens.num_frames, f.shape[1], device=f.device).index_add_(0, tokens.frame, f)
        n = tokens.frame_counts[tokens.frame].float()
        mean_cos = ((f * sums[tokens.frame]).sum(-1) - 1.0) / torch.clamp(n - 1, min=1)
        score = self.alpha * minmax(importance(tokens)) + (1 - self.alpha) * (1 - minmax(mean_cos))
        counts = tokens.frame_counts
        keep = topk_per_frame(score, tokens, split_budget(counts, budget))
        return keep, tokens.features[keep]
