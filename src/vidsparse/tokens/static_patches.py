"""``static_patches``: skip what does not move, before and after the vision tower (Gated-Residual-Tokenization style).

Before the tower (Qwen2.5-VL adapter, ``encode_video(frames, skip_static=tau)``): each merged token's pixels (28×28
over the two frames of a temporal patch, normalised) are compared with the same pixels one temporal patch earlier;
the mean absolute change is the token's ``motion``. A temporal patch in which every token moves less than ``tau`` is
not encoded at all — its tokens reuse the previous patch's tokens. This is exact for every encoded patch, because
Qwen2.5-VL's tower never attends across temporal patches (windows and full-attention segments are per patch, its
rotary positions are 2-D), so dropping whole patches changes no other output.

After the tower (this reducer): the ``budget`` tokens that moved most are kept in order, the first patch always kept
(motion +inf). Without pixel motion (tokens from another source) it falls back to 1 − cosine to the same position in
the previous frame, i.e. ``evs``.

Fidelity (tests/tolerances.py ``STATIC_REUSE_COS``): on a video whose static stretches are pixel-identical, reused
tokens equal the real encoding (cosine 1); with sensor noise below ``tau`` they stay above the stated cosine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, prev_same_position, unit


@TOKENS.register("static_patches", pixel_motion=True)
@dataclass
class StaticPatches(TokenReducer):
    """tau: mean absolute change (in normalised pixel units, ≈ 1/0.27 per unit of [0, 1] intensity) below which a
    token counts as static; a temporal patch whose tokens are all static is not encoded."""

    tau: float = 0.02

    def __post_init__(self):
        if self.tau < 0:
            raise ValueError("tau must be >= 0")

    def _reduce(self, tokens, budget):
        if tokens.motion is not None:
            score = tokens.motion.float()
        else:
            f = unit(tokens.features)
            prev = prev_same_position(tokens)
            score = 1.0 - (f * f[prev.clamp(min=0)]).sum(-1)
            score = torch.where(prev < 0, torch.full_like(score, float("inf")), score)
        keep = torch.argsort(-score.double(), stable=True)[:budget]
        return keep, tokens.features[keep]
