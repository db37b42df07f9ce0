"""``prunevid``: PruneVid (Visual-AI/PruneVid). (1) Temporal segments: DPC-kNN over frame-mean features picks
``segment_ratio``·T centres; every frame joins its nearest centre and segments are the runs of equal labels in time.
(2) In each segment, a position whose tokens keep mean consecutive-frame cosine > ``static_threshold`` (0.8) is
static: its tokens are averaged over time into the first frame's token; the others stay per frame. (3) The
remaining tokens are clustered per segment with DPC-kNN (k = ``k``) down to the budget, each cluster averaged into
its centre token. PruneVid clusters to a fixed 50%; here the budget sets the count, split over segments by their
remaining tokens. If the static merge alone leaves fewer tokens than the budget, the least static positions are
un-merged first.

Fix to the reference (METHODS.md §6): density ties are broken by index, not random noise, so results do not depend
on the seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, dpc_cluster, dpc_knn, split_budget, unit


def temporal_segments(tokens, ratio: float, k: int) -> torch.Tensor:
    """int64 [T]: segment id per frame (contiguous runs of the nearest DPC-kNN centre)."""
    t = tokens.num_frames
    means = tokens.frame_means()
    if t == 1:
        return torch.zeros(1, dtype=torch.int64, device=means.device)
    rho, delta = dpc_knn(means, k)
    n_c = max(1, min(t, round(t * ratio)))
    centres = torch.topk(rho * delta, n_c).indices
    label = torch.argmin(torch.cdist(means, means[centres]), dim=1)
    return torch.cat([label.new_zeros(1), (label[1:] != label[:-1]).long()]).cumsum(0)


@TOKENS.register("prunevid")
@dataclass
class PruneVid(TokenReducer):
    segment_ratio: float = 0.25
    static_threshold: float = 0.8
    k: int = 5
    max_pairs: int = 1 << 26  # entries of one batched distance table (memory bound, not a method parameter)

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        n = len(tokens)
        seg_of_frame = temporal_segments(tokens, self.segment_ratio, self.k)
        seg = seg_of_frame[tokens.frame]
        # Static positions: same (h, w) and grid in consecutive frames of a segment.
        from .base import prev_same_position

        prev = prev_same_position(tokens)
        linked = (prev >= 0) & (seg == seg[prev.clamp(min=0)])
        fu = unit(tokens.features)
        cos = torch.where(linked, (fu * fu[prev.clamp(min=0)]).sum(-1), torch.zeros(n, device=dev))
        # Chain root: the first frame's token of each (segment, position) run.
        root = torch.arange(n, device=dev)
        for _ in range(int(tokens.num_frames)):  # pointer jumping; converges in log2(T) rounds
            nxt = torch.where(linked[root], prev.clamp(min=0)[root], root)
            if torch.equal(nxt, root):
                break
            root = nxt
        run_len = torch.bincount(root, minlength=n).float()
        run_cos = torch.zeros(n, device=dev).index_add_(0, root, cos) / (run_len - 1).clamp(min=1)
        static_root = (run_len > 1) & (run_cos > self.static_threshold)
        # Un-merge the least static runs while the merge would leave fewer tokens than the budget.
        saved = (run_len - 1) * static_root
        surplus = (n - int(saved.sum())) - budget
        if surplus < 0:
            order = torch.argsort(torch.where(static_root, run_cos, torch.full_like(run_cos, 9.0)), stable=True)
            back = saved[order].cumsum(0)
            undo = order[: int((back < -surplus).sum()) + 1]
            static_root[undo] = False
        rep = torch.where(static_root[root], root, torch.arange(n, device=dev))  # token each token is averaged into
        feats = tokens.features.float()
        sums = torch.zeros_like(feats).index_add_(0, rep, feats)
        cnt = torch.bincount(rep, minlength=n).float()
        alive = torch.nonzero(cnt > 0).flatten()
        merged = sums[alive] / cnt[alive][:, None]
        # Cluster the survivors per segment down to the budget, segments batched (padded) in groups whose pairwise
        # distance tables stay within ``max_pairs`` entries: one set of batched ops per group, bounded memory.
        aseg = seg[alive]
        nseg = int(seg.max()) + 1
        cnt_s = torch.bincount(aseg, minlength=nseg)
        per = split_budget(cnt_s, budget)
        order = torch.argsort(aseg, stable=True)
        start = torch.cumsum(torch.cat([cnt_s.new_zeros(1), cnt_s[:-1]]), 0)
        slot = torch.arange(alive.numel(), device=dev) - start[aseg[order]]
        keep, out = [], []
        sizes = cnt_s.tolist()
        s0 = 0
        while s0 < nseg:
            s1, width = s0, 0
            while s1 < nseg and (s1 - s0 + 1) * max(width, sizes[s1]) ** 2 <= self.max_pairs or s1 == s0:
                width = max(width, sizes[s1])
                s1 += 1
            sel = (aseg[order] >= s0) & (aseg[order] < s1)
            pos = torch.full((s1 - s0, max(1, width)), -1, dtype=torch.int64, device=dev)
            pos[aseg[order][sel] - s0, slot[sel]] = order[sel]  # index into ``alive``/``merged``
            valid = pos >= 0
            x = merged[pos.clamp(min=0)]
            is_c, label = dpc_cluster(x, valid, per[s0:s1], self.k)
            w = torch.where(valid, cnt[alive[pos.clamp(min=0)]], torch.zeros_like(valid, dtype=torch.float32))
            sums = torch.zeros_like(x).scatter_add_(1, label[..., None].expand_as(x), x * w[..., None])
            wsum = torch.zeros(s1 - s0, pos.shape[1], device=dev).scatter_add_(1, label, w)
            keep.append(alive[pos[is_c]])
            out.append((sums / wsum.clamp(min=1e-12)[..., None])[is_c])
            s0 = s1
        return torch.cat(keep), torch.cat(out).to(tokens.features.dtype)
