"""``framefusion`` (thu-nics/FrameFusion, Fu et al. 2024): merge, then prune, inside the language model.

Merging: entering each of the first layers, a visual token whose hidden state has cosine ≥ ``sim`` with the token at
the same (h, w) in the previous frame is merged into it (chains resolve to the earliest token; the survivor carries
the group mean). Merging repeats at the next layer while a layer still merges ≥ ``min_ratio`` of the visual tokens
(at most ``merge_layers`` layers). Pruning: after layer ``k``, FastV-style — the visual tokens the last token attends to
least in layer ``k − 1`` go, as many as needed for the whole prefill to cost ``cost`` × the dense model (cost counted
as tokens × layers). Positions of survivors are their own (merged tokens stand at the earliest member's position)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.hf import last_query_attention
from ...registry import INLLM
from .base import Cut, InLLMReducer
from .fastv import rank_keep


class FrameFusionCut(Cut):
    def __init__(self, visual, seq_len, grid, num_layers, sim, min_ratio, merge_layers, k, cost):
        super().__init__(visual, seq_len)
        self.grid = grid  # int64 [K, 3] (t, h, w) of the visual tokens s..e
        self.num_layers, self.sim, self.min_ratio = num_layers, sim, min_ratio
        self.merge_layers, self.k, self.cost = merge_layers, k, cost
        self.merging = True
        self.spent = 0  # tokens x layers so far
        self.merged = 0

    def before_layer(self, layer_idx, hidden):
        if not self.merging or layer_idx >= min(self.merge_layers, self.k):
            self.merging = False
            return
        dev = hidden.device
        cols = self.columns.to(dev) if self.columns is not None else torch.arange(self.current, device=dev)
        s, e = self.visual
        vis = torch.nonzero((cols >= s) & (cols < e)).squeeze(1)
        if vis.numel() < 2:
            self.merging = False
            return
        g = self.grid.to(dev)[cols[vis] - s]  # (t, h, w) of current visual tokens
        t, h, w = g[:, 0], g[:, 1], g[:, 2]
        hh, ww = int(h.max()) + 1, int(w.max()) + 1
        slot = (t * hh + h) * ww + w
        table = torch.full((int(slot.max()) + 1,), -1, dtype=torch.long, device=dev)
        table[slot] = torch.arange(vis.numel(), device=dev)
        prev_slot = slot - hh * ww
        prev = torch.where(prev_slot >= 0, table[prev_slot.clamp(min=0)], torch.full_like(slot, -1))
        x = hidden[0, vis].float()
        ok = prev >= 0
        cos = torch.zeros(vis.numel(), device=dev)
        cos[ok] = torch.nn.functional.cosine_similarity(x[ok], x[prev[ok]], dim=-1)
        merge = ok & (cos >= self.sim)
        n_merge = int(merge.sum())
        if n_merge / vis.numel() < self.min_ratio:
            self.merging = False
        if n_merge == 0:
            return
        parent = torch.arange(vis.numel(), device=dev)
        parent[merge] = prev[merge]
        while True:  # pointer jumping: every chain resolves to its earliest member
            nxt = parent[parent]
            if torch.equal(nxt, parent):
                break
            parent = nxt
        members = torch.nonzero(merge).squeeze(1)
        keep_mask = torch.ones(self.current, dtype=torch.bool, device=dev)
        keep_mask[vis[members]] = False
        self.cut(torch.nonzero(keep_mask).squeeze(1), members=vis[members], into=vis[parent[members]])
        self.merged += n_merge

    def on_prefill_attention(self, layer_idx, q, k, v, out):
        self.spent += q.shape[2]
        if layer_idx != self.k - 1 or q.shape[2] != self.current:
            return
        is_vis = self.visual_columns().to(q.device)
        n_text = int((~is_vis).sum())
        rest = self.num_layers - self.k
        budget_tokens = (self.cost * self.num_layers * self.seq_len - self.spent) / max(rest, 1)
        keep_visual = int(max(1, min(int(is_vis.sum()), round(budget_tokens) - n_text)))
        self.cut(rank_keep(last_query_attention(q, k)[0], is_vis, keep_visual))


@INLLM.register("framefusion")
@dataclass
class FrameFusion(InLLMReducer):
    """sim: cosine threshold for merging; min_ratio: keep merging while a layer merges at least this fraction;
    merge_layers: layers that may merge; k: pruning after layer k; cost: target prefill cost vs dense."""

    sim: float = 0.6
    min_ratio: float = 0.1
    merge_layers: int = 2
    k: int = 2
    cost: float = 0.3

    def __post_init__(self):
        if not 0.0 < self.cost <= 1.0:
            raise ValueError("cost must be in (0, 1]")
        if self.k < 1 or self.merge_layers < 0:
            raise ValueError("k must be >= 1 and merge_layers >= 0")

    def plan(self, visual, seq_len, num_layers, visual_grid=None) -> Cut:
        if visual_grid is None:
            raise ValueError("framefusion needs the (t, h, w) grid of the visual tokens")
        if self.k >= num_layers:
            raise ValueError(f"framefusion k={self.k} but the model has {num_layers} layers")
        return FrameFusionCut(visual, seq_len, visual_grid, num_layers, self.sim, self.min_ratio, self.merge_layers,
                              self.k, self.cost)
