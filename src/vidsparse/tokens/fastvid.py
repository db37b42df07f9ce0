"""``fastvid``: FastVID (LunarShen/FastVID) — dynamic temporal segmentation, then density-based spatio-temporal
pruning.

Segments: cut after the c − 1 = 7 lowest adjacent-frame cosines (frame-mean features) and wherever that cosine is
below τ = 0.9. Per frame, ``salient_share`` (60%) of its budget is kept as the most salient tokens (attention
received; feature norm without it). The other 40% of the segment's budget goes to anchor frames — every p = 4-th frame
counted back from the segment's end — as density peaks (DPC-kNN, k = 4) among their non-salient tokens. Every other
non-salient token of the segment merges into its nearest anchor (cosine), the anchor's weight being
max(1 / (n + 1), β = 0.6) for n merged tokens. The budget replaces FastVID's retention ratio r."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, dpc_knn, importance, merge_into, split_budget, topk_per_frame, unit


def fastvid_segments(tokens, cuts: int = 7, tau: float = 0.9) -> torch.Tensor:
    """int64 [T]: segment id per frame."""
    t = tokens.num_frames
    means = tokens.frame_means()
    if t == 1:
        return torch.zeros(1, dtype=torch.int64, device=means.device)
    m = unit(means)
    sim = (m[1:] * m[:-1]).sum(-1)  # [T-1]
    cut = sim < tau
    low = torch.argsort(sim, stable=True)[: min(cuts, t - 1)]
    cut[low] = True
    return torch.cat([cut.new_zeros(1, dtype=torch.int64), cut.long()]).cumsum(0)


@TOKENS.register("fastvid")
@dataclass
class FastVID(TokenReducer):
    cuts: int = 7
    tau: float = 0.9
    salient_share: float = 0.6
    anchor_every: int = 4
    k: int = 4
    beta: float = 0.6

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        n = len(tokens)
        counts = tokens.frame_counts
        per = split_budget(counts, budget)
        sal_n = torch.floor(per.double() * self.salient_share).long()
        salient = topk_per_frame(importance(tokens), tokens, sal_n)
        is_sal = torch.zeros(n, dtype=torch.bool, device=dev)
        is_sal[salient] = True
        seg_f = fastvid_segments(tokens, self.cuts, self.tau)
        nseg = int(seg_f.max()) + 1
        feats = tokens.features.float().clone()
        keep = [salient]
        fu = unit(tokens.features)
        for s in range(nseg):  # one pass per segment
            frames = torch.nonzero(seg_f == s).flatten()
            want = int((per[frames] - sal_n[frames]).sum())
            last = int(frames.max())
            anchors_f = frames[(last - frames) % self.anchor_every == 0]
            pool_mask = (~is_sal) & (seg_f[tokens.frame] == s)
            in_anchor = pool_mask & torch.isin(tokens.frame, anchors_f)
            cand = torch.nonzero(in_anchor).flatten()
            if want <= 0:
                continue
            if cand.numel() < want:  # anchor frames too small: any non-salient token of the segment may anchor
                cand = torch.nonzero(pool_mask).flatten()
            if cand.numel() <= want:
                keep.append(cand)
                continue
            rho, delta = dpc_knn(tokens.features[cand], self.k)
            anchor = cand[torch.topk(rho * delta, want).indices]
            members = torch.nonzero(pool_mask).flatten()
            members = members[~torch.isin(members, anchor)]
            if members.numel():
                into = torch.argmax(fu[members] @ fu[anchor].T, dim=1)
                cnt = torch.bincount(into, minlength=anchor.numel()).float()
                w = torch.clamp(1.0 / (cnt + 1.0), min=self.beta)
                feats[anchor] = merge_into(tokens.features, members, anchor, into, anchor.numel(), self_weight=w)
            keep.append(anchor)
        keep = torch.cat(keep)
        if keep.numel() < budget:  # segments without enough tokens: top up by saliency
            score = importance(tokens).clone()
            score[keep] = -float("inf")
            keep = torch.cat([keep, torch.argsort(-score.double(), stable=True)[: budget - keep.numel()]])
        return keep, feats[keep].to(tokens.features.dtype)
