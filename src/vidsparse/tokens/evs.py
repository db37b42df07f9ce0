"""``evs``: vLLM's Efficient Video Sampling (the ``video_pruning_rate`` knob of vLLM and SGLang).

Each token scores 1 − cos(token, same position in the previous frame); the first frame (and any frame whose grid
differs from the one before) scores +inf, so it is always kept; the top ``budget`` survive in original order.
``evs_budget`` maps a pruning rate q to a budget as vLLM does, max(tpf, T·tpf·(1 − q)), but rounded rather than
truncated (vLLM: int(200·0.1) style truncation loses a token, METHODS.md §6). Dissimilarities within 1e-6 of zero
are zeroed so identical frames tie exactly and the stable order decides, instead of rounding noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, prev_same_position, unit


def evs_budget(num_frames: int, tokens_per_frame: int, video_pruning_rate: float) -> int:
    if not 0.0 <= video_pruning_rate < 1.0:
        raise ValueError("video_pruning_rate must be in [0, 1)")
    return max(tokens_per_frame, int(round(num_frames * tokens_per_frame * (1.0 - video_pruning_rate))))


@TOKENS.register("evs")
@dataclass
class EVS(TokenReducer):
    def _reduce(self, tokens, budget):
        f = unit(tokens.features)
        prev = prev_same_position(tokens)
        dis = 1.0 - (f * f[prev.clamp(min=0)]).sum(-1)
        dis = torch.where(dis.abs() < 1e-6, torch.zeros_like(dis), dis)
        dis = torch.where(prev < 0, torch.full_like(dis, float("inf")), dis)
        keep = torch.argsort(-dis.double(), stable=True)[:budget]
        return keep, tokens.features[keep]
