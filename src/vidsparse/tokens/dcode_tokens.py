"""``dcode_tokens``: D-CoDe token compression (hukcc/D-CoDe), per frame. Candidates: the top ``oversample``×k tokens
by L2 norm. Greedy leader merging in norm order: a candidate within cosine ``threshold`` (0.8) of an earlier leader
joins it, otherwise it leads (at most k leaders); members are averaged into the most similar leader. Frames left
with fewer than k leaders take the next tokens by norm.

Fix to the reference (METHODS.md §6): leaders never merge into anything, so a chain of similar tokens can no longer
make a kept token disappear. The greedy is computed in parallel rounds (see ``_reduce``), identical to the
sequential scan, vectorised across frames."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import TOKENS
from .base import TokenReducer, merge_into, split_budget, topk_per_frame, unit


@TOKENS.register("dcode_tokens")
@dataclass
class DCoDeTokens(TokenReducer):
    threshold: float = 0.8
    oversample: float = 2.0

    def _reduce(self, tokens, budget):
        dev = tokens.features.device
        n = len(tokens)
        counts = tokens.frame_counts
        per = split_budget(counts, budget)
        norm = tokens.features.float().norm(dim=-1)
        cand = topk_per_frame(norm, tokens, torch.minimum(counts, torch.ceil(per.double() * self.oversample).long()))
        # Candidates per frame, padded to [T, M] in norm order.
        cf = tokens.frame[cand]
        order = torch.argsort(-norm[cand].double(), stable=True)
        order = order[torch.argsort(cf[order], stable=True)]
        cand, cf = cand[order], cf[order]
        t = tokens.num_frames
        ccount = torch.bincount(cf, minlength=t)
        m = int(ccount.max())
        start = torch.cumsum(torch.cat([ccount.new_zeros(1), ccount[:-1]]), 0)
        slot = torch.arange(cand.numel(), device=dev) - start[cf]
        pad = torch.full((t, m), -1, dtype=torch.int64, device=dev)
        pad[cf, slot] = cand
        valid = pad >= 0
        f = unit(tokens.features)[pad.clamp(min=0)]
        close = (f @ f.transpose(1, 2)) >= self.threshold  # [T, M, M]
        close &= valid[:, :, None] & valid[:, None, :]
        # Greedy leaders in norm order, computed in parallel rounds: an undecided candidate with no undecided
        # higher-norm neighbour leads (nothing before it can cover it any more); its undecided neighbours are covered.
        # This is exactly the sequential greedy; rounds = the longest chain of overlapping candidates, not k.
        before = torch.ones(m, m, dtype=torch.bool, device=dev).tril(-1)  # [i, j]: j precedes i in norm order
        blocked_by = close & before[None]
        undecided = valid.clone()
        leader = torch.zeros_like(valid)
        while bool(undecided.any()):
            waiting = (blocked_by & undecided[:, None, :]).any(2)
            new = undecided & ~waiting
            covered = (close & new[:, None, :]).any(2) & undecided & ~new
            leader |= new
            undecided &= ~(new | covered)
        # The cap: only the first per[t] leaders (in norm order) of each frame lead; later ones become candidates
        # that merge into a kept leader when close enough, as in the sequential greedy with a leader limit.
        rank = leader.long().cumsum(1) - 1
        leader &= rank < per[:, None]
        n_lead = leader.sum(1)
        lead_idx = pad[leader]
        # Top up frames with too few leaders by norm among tokens that are not leaders or merged candidates.
        short = per - n_lead
        used = torch.zeros(n, dtype=torch.bool, device=dev)
        used[lead_idx] = True
        merged = pad[valid & ~leader]
        score = torch.where(used, torch.full_like(norm, -1.0), norm)
        score[merged] = -0.5  # merged candidates only after unused tokens
        extra = topk_per_frame(score, tokens, short)
        keep = torch.cat([lead_idx, extra])
        merged = merged[~torch.isin(merged, extra)]  # a candidate kept to fill the budget is no longer a member
        # Members: candidates that did not lead join their most similar leader of the same frame.
        feats = tokens.features.float().clone()
        if merged.numel() and lead_idx.numel():
            fu = unit(tokens.features)
            sim = fu[merged] @ fu[lead_idx].T
            sim = sim.masked_fill(tokens.frame[merged][:, None] != tokens.frame[lead_idx][None, :], float("-inf"))
            best = torch.argmax(sim, 1)
            ok = sim.gather(1, best[:, None]).squeeze(1) >= self.threshold
            feats[lead_idx] = merge_into(tokens.features, merged[ok], lead_idx, best[ok], lead_idx.numel())
        return keep, feats[keep].to(tokens.features.dtype)
