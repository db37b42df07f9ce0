"""``dycoke``: DyCoke's temporal token merging (KD-TAO/DyCoke, TTM). In pairs, frame 2i+1 is compared with frame 2i at
the same positions; in windows of four, frame i+2 is compared with frame i. A compared token's redundancy is its
cosine to its reference; the most redundant tokens are pruned first (DyCoke prunes K = 0.7 of each compared frame;
``dycoke_budget`` gives that budget). Reference frames (0, 4, 8, …) are never pruned unless the budget demands it,
then least-important-first by feature norm.

Fixes to the reference (METHODS.md §6): ≤ 4 frames no longer raise; an odd last frame is compared, not dropped; every
window's third frame is pruned (with 8 frames the reference skipped frame 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, unit


def references(tokens) -> torch.Tensor:
    """int64 [N]: the token each token is compared with (same position, reference frame), or -1 for reference frames."""
    hw = tokens.frame_hw
    t_all = tokens.frame
    counts = hw[:, 0] * hw[:, 1]
    starts = torch.cumsum(torch.cat([counts.new_zeros(1), counts[:-1]]), 0)
    tf = torch.arange(tokens.num_frames, device=hw.device)
    ref_frame = torch.where(tf % 2 == 1, tf - 1, torch.where(tf % 4 == 2, tf - 2, torch.full_like(tf, -1)))
    ok = ref_frame >= 0
    ok &= (hw[ref_frame.clamp(min=0)] == hw).all(1)  # same grid, so positions line up
    local = torch.arange(len(tokens), device=hw.device) - starts[t_all]
    ref = starts[ref_frame.clamp(min=0)][t_all] + local
    return torch.where(ok[t_all], ref, torch.full_like(ref, -1))


def dycoke_budget(num_tokens_per_frame: list[int], k: float = 0.7) -> int:
    """The token count DyCoke's TTM leaves: compared frames keep (1 − K) of their tokens."""
    total = 0
    for t, n in enumerate(num_tokens_per_frame):
        compared = t % 2 == 1 or t % 4 == 2
        total += n - int(round(k * n)) if compared else n
    return total


@TOKENS.register("dycoke")
@dataclass
class DyCoke(TokenReducer):
    def _reduce(self, tokens, budget):
        f = unit(tokens.features)
        ref = references(tokens)
        redundancy = torch.where(ref >= 0, (f * f[ref.clamp(min=0)]).sum(-1), torch.full((len(tokens),), -2.0, device=f.device))
        # Prune order: compared tokens by redundancy (most redundant first), then reference tokens by lowest norm.
        norm = tokens.features.float().norm(dim=-1)
        key = torch.where(ref >= 0, 10.0 + redundancy, -norm / (norm.max() + 1e-9))
        drop = torch.argsort(-key.double(), stable=True)[: len(tokens) - budget]
        keep_mask = torch.ones(len(tokens), dtype=torch.bool, device=f.device)
        keep_mask[drop] = False
        keep = torch.nonzero(keep_mask).flatten()
        return keep, tokens.features[keep]
