"""``aot``: AOT, optimal-transport anchors (TyroneLi/AOT).

Intra-frame: per frame, k anchors — half local (tokens that are the attention maximum of their 9×9 neighbourhood,
best first) and half global (the best remaining by attention; the feature norm without attention). The frame's other
tokens are transported onto its anchors by entropic OT (Sinkhorn, ε = 0.1, uniform marginals, cost = (1 − cos) +
0.5·distance of normalised grid positions), and each anchor becomes
0.9·(a + Σ_m P_mn x_m) / (1 + Σ_m P_mn) + 0.1·(mean of the tokens whose largest plan entry is that anchor),
with P the plan normalised so each token's mass is 1.

Inter-frame: in clips of ``clip`` (4) frames, the anchors of frames 2..4 are transported onto the first frame's
anchors with cost (1 − cos)·(1 − exp(−Δt² / (2σ²))), σ = 1.5. The tokens whose largest row-normalised plan entry is
highest merge softly into the first frame's anchors; the rest stay distinct. ``inter_share`` of the intra-frame
tokens is removed this way; the intra-frame budget is set so that exactly ``budget`` tokens remain.

Fixes to the reference (METHODS.md §6): Sinkhorn stops on a relative marginal error of ``tol`` = 1e-4 (the
reference's 1e-2 absolute usually stopped after two iterations); Δt is a scalar frame distance (1-D timestamps
raised there); no max_dt division (it produced NaN); windows are computed by dilation, not by a top-k that could
return one index short. Frames and clips are batched, padded, through one Sinkhorn."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, importance, split_budget, topk_per_frame, unit


def sinkhorn(cost: torch.Tensor, eps: float = 0.1, iters: int = 100, tol: float = 1e-4,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropic OT plans with uniform marginals, batched: cost [B, M, K] -> plan [B, M, K] (rows sum to 1/M_b,
    columns to 1/K_b over the valid entries of ``mask``). Log-domain for stability."""
    b, m, k = cost.shape
    if mask is None:
        mask = torch.ones_like(cost, dtype=torch.bool)
    rows = mask.any(2)
    cols = mask.any(1)
    log_a = torch.where(rows, -torch.log(rows.sum(1, keepdim=True).float()), torch.full_like(rows, -float("inf"), dtype=torch.float32))
    log_b = torch.where(cols, -torch.log(cols.sum(1, keepdim=True).float()), torch.full_like(cols, -float("inf"), dtype=torch.float32))
    logk = torch.where(mask, -cost.float() / eps, torch.full_like(cost, -float("inf"), dtype=torch.float32))
    f = torch.zeros(b, m, device=cost.device)
    g = torch.zeros(b, k, device=cost.device)
    for _ in range(iters):
        f = torch.where(rows, log_a - torch.logsumexp(logk + g[:, None, :], dim=2), torch.zeros_like(f))
        g = torch.where(cols, log_b - torch.logsumexp(logk + f[:, :, None], dim=1), torch.zeros_like(g))
        plan = torch.exp(logk + f[:, :, None] + g[:, None, :])
        err = (plan.sum(2) - log_a.exp()).abs() / log_a.exp().clamp(min=1e-30)
        if float(torch.where(rows, err, torch.zeros_like(err)).max()) < tol:
            break
    return torch.exp(logk + f[:, :, None] + g[:, None, :])


def _pad_groups(group: torch.Tensor, ngroups: int, values: torch.Tensor):
    """Scatter 1-D ``values`` into a padded [G, L] table by group (stable within group); -1 pads."""
    order = torch.argsort(group, stable=True)
    g = group[order]
    cnt = torch.bincount(g, minlength=ngroups)
    start = torch.cumsum(torch.cat([cnt.new_zeros(1), cnt[:-1]]), 0)
    slot = torch.arange(g.numel(), device=g.device) - start[g]
    width = int(cnt.max()) if g.numel() else 1
    table = torch.full((ngroups, max(1, width)), -1, dtype=torch.int64, device=g.device)
    table[g, slot] = values[order]
    return table


def local_maxima(score: torch.Tensor, tokens, window: int = 9) -> torch.Tensor:
    """bool [N]: tokens whose score is the maximum of their window×window neighbourhood in their frame (ties on a
    plateau go to the first token in raster order)."""
    out = torch.zeros(len(tokens), dtype=torch.bool, device=score.device)
    idx = torch.arange(len(tokens), device=score.device, dtype=torch.float64)
    span = float(score.max() - score.min()) if len(tokens) else 1.0
    tb = score.double() - idx * (max(span, 1.0) * 1e-12)
    for a, (h, w) in zip(tokens.frame_slices(), tokens.frame_hw.tolist()):  # per frame grid (frames may differ)
        s = tb[a[0] : a[1]].view(1, 1, h, w)
        peak = torch.nn.functional.max_pool2d(s, window, stride=1, padding=window // 2)
        out[a[0] : a[1]] = (s >= peak).flatten()
    return out


@TOKENS.register("aot")
@dataclass
class AOT(TokenReducer):
    eps: float = 0.1
    iters: int = 100
    tol: float = 1e-4
    spatial_weight: float = 0.5
    window: int = 9
    clip: int = 4
    sigma: float = 1.5
    inter_share: float = 0.25

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        n = len(tokens)
        t = tokens.num_frames
        counts = tokens.frame_counts
        b1 = min(n, int(round(budget / (1.0 - self.inter_share)))) if t > 1 else budget
        per = split_budget(counts, b1)
        first_of_clip = (torch.arange(t, device=dev) % self.clip) == 0
        if int(per[~first_of_clip].sum()) < b1 - budget:
            b1, per = budget, split_budget(counts, budget)
        anchors, feats = self._intra(tokens, per)
        if b1 == budget:
            return anchors, feats[anchors].to(tokens.features.dtype)
        return self._inter(tokens, anchors, feats, b1 - budget)

    def _intra(self, tokens, per):
        dev = tokens.features.device
        n = len(tokens)
        score = importance(tokens)
        peaks = local_maxima(score, tokens, self.window)
        n_local = per // 2
        # Local anchors: peaks first (by score), then global anchors: the best of the rest.
        local = topk_per_frame(torch.where(peaks, score, torch.full_like(score, -float("inf"))), tokens, n_local)
        local = local[torch.isfinite(score[local]) & peaks[local]]
        taken = torch.zeros(n, dtype=torch.bool, device=dev)
        taken[local] = True
        got = torch.bincount(tokens.frame[local], minlength=tokens.num_frames)
        rest = topk_per_frame(torch.where(taken, torch.full_like(score, -float("inf")), score), tokens, per - got)
        anchors = torch.cat([local, rest])
        is_anchor = torch.zeros(n, dtype=torch.bool, device=dev)
        is_anchor[anchors] = True
        feats = tokens.features.float().clone()
        src = torch.nonzero(~is_anchor).flatten()
        if src.numel() == 0 or anchors.numel() == 0:
            return anchors, feats
        tf = tokens.num_frames
        a_tab = _pad_groups(tokens.frame[anchors], tf, anchors)  # [T, K]
        s_tab = _pad_groups(tokens.frame[src], tf, src)  # [T, M]
        fu = unit(tokens.features)
        hw = tokens.frame_hw.float()
        pos = tokens.positions[:, 1:].float() / hw[tokens.frame].clamp(min=1)
        sa, aa = s_tab.clamp(min=0), a_tab.clamp(min=0)
        cost = (1 - torch.einsum("tmd,tkd->tmk", fu[sa], fu[aa])) + \
            self.spatial_weight * torch.cdist(pos[sa], pos[aa])
        mask = (s_tab >= 0)[:, :, None] & (a_tab >= 0)[:, None, :]
        plan = sinkhorn(cost, self.eps, self.iters, self.tol, mask)
        p = plan / plan.sum(2, keepdim=True).clamp(min=1e-30)  # each token's mass = 1
        p = torch.where(mask, p, torch.zeros_like(p))
        x = feats[sa] * (s_tab >= 0)[..., None]
        moved = torch.einsum("tmk,tmd->tkd", p, x)
        mass = p.sum(1)
        a_feat = feats[aa]
        ot = (a_feat + moved) / (1 + mass)[..., None]
        near = torch.argmax(torch.where(mask, p, torch.full_like(p, -1.0)), dim=2)  # [T, M]
        onehot = torch.nn.functional.one_hot(near, a_tab.shape[1]).float() * (s_tab >= 0)[..., None]
        nn_cnt = onehot.sum(1)
        nn_mean = torch.where(nn_cnt[..., None] > 0, torch.einsum("tmk,tmd->tkd", onehot, x) / nn_cnt.clamp(min=1)[..., None], a_feat)
        new = 0.9 * ot + 0.1 * nn_mean
        valid = a_tab >= 0
        feats[a_tab[valid]] = new[valid]
        return anchors, feats

    def _inter(self, tokens, anchors, feats, remove: int):
        af = tokens.frame[anchors]
        clip_of = af // self.clip
        first = af % self.clip == 0
        targets, sources = anchors[first], anchors[~first]
        nclip = int(clip_of.max()) + 1
        tgt_tab = _pad_groups(clip_of[first], nclip, targets)
        src_tab = _pad_groups(clip_of[~first], nclip, sources)
        fu = unit(feats)
        st, tt = src_tab.clamp(min=0), tgt_tab.clamp(min=0)
        dt = (tokens.frame[st][:, :, None] - tokens.frame[tt][:, None, :]).float()
        cost = (1 - torch.einsum("cmd,ckd->cmk", fu[st], fu[tt])) * (1 - torch.exp(-dt**2 / (2 * self.sigma**2)))
        mask = (src_tab >= 0)[:, :, None] & (tgt_tab >= 0)[:, None, :]
        plan = sinkhorn(cost, self.eps, self.iters, self.tol, mask)
        p = plan / plan.sum(2, keepdim=True).clamp(min=1e-30)
        p = torch.where(mask, p, torch.zeros_like(p))
        peak = torch.where(src_tab >= 0, p.max(2).values, torch.full_like(p[..., 0], -1.0))
        # Merge the ``remove`` sources whose plan is most concentrated (clearly one target's duplicate).
        flat = torch.argsort(-peak.flatten().double(), stable=True)[:remove]
        merge = torch.zeros_like(peak, dtype=torch.bool).flatten()
        merge[flat] = True
        merge = merge.view_as(peak) & (src_tab >= 0)
        pm = p * merge[..., None]
        x = feats[st] * merge[..., None]
        moved = torch.einsum("cmk,cmd->ckd", pm, x)
        mass = pm.sum(1)
        new = (feats[tt] + moved) / (1 + mass)[..., None]
        out = feats.clone()
        valid = tgt_tab >= 0
        out[tgt_tab[valid]] = new[valid]
        gone = src_tab[merge]
        keep = anchors[~torch.isin(anchors, gone)]
        return keep, out[keep].to(tokens.features.dtype)
