"""``zipvl`` (ZipVL, He et al. 2024): per layer, the smallest set of tokens holding a fraction ``tau`` of the attention
mass of probe queries; every query then attends only to those tokens (plus the text, always kept).

Probes: the last ``recent`` queries plus ``random`` queries drawn uniformly (fixed seed) from the rest, as in the
paper. Mass per key = softmax weight averaged over probes and heads (causal). The ratio is adaptive: a layer whose
attention is concentrated keeps few tokens. Nothing is dropped from the sequence or the cache (``zipvl_kv`` would
quantise the rest); what shrinks is prefill attention work, reported as the mean kept-key fraction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...attention.patterns.base import column_probs
from ...registry import INLLM
from .base import Cut, InLLMReducer


def probe_mass(q, k, probes, scale=None):
    """float32 [N]: attention mass each key receives from the probe queries (mean over probes and heads)."""
    return column_probs(q[:, :, probes], k, probes, scale=scale)[0][0].mean(0) / len(probes)


def top_mass(mass, candidates, tau: float):
    """The smallest subset of ``candidates`` holding ``tau`` of their mass (at least one)."""
    m = mass[candidates]
    order = torch.argsort(m, descending=True)
    c = torch.cumsum(m[order], 0)
    need = int(torch.searchsorted(c, tau * c[-1]).item()) + 1
    return candidates[order[: min(need, len(order))]]


class ZipVLSelector(Cut):
    def __init__(self, visual, seq_len, tau, recent, random, layers_from):
        super().__init__(visual, seq_len)
        self.tau, self.recent, self.random, self.layers_from = tau, recent, random, layers_from
        self.kept: dict[int, int] = {}

    def select_keys(self, layer, q, k):
        n = k.shape[2]
        if layer is None or layer < self.layers_from or n != self.seq_len:
            return None
        s, e = self.visual
        dev = q.device
        rec = torch.arange(max(0, n - self.recent), n, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(layer)
        rnd = torch.randint(0, max(1, n - self.recent), (min(self.random, max(0, n - self.recent)),), generator=gen)
        probes = torch.unique(torch.cat([rec, rnd.to(dev)]))
        mass = probe_mass(q, k, probes)
        vis = torch.arange(s, e, device=dev)
        keep_vis = top_mass(mass, vis, self.tau)
        keys = torch.cat([torch.arange(s, device=dev), keep_vis, torch.arange(e, n, device=dev)]).sort().values
        self.kept[layer] = int(keep_vis.numel())
        return keys


@INLLM.register("zipvl")
@dataclass
class ZipVL(InLLMReducer):
    """tau: attention mass the kept visual tokens must hold; recent/random: probe queries; layers_from: first layer
    that applies it (the paper keeps the first layers dense)."""

    tau: float = 0.975
    recent: int = 64
    random: int = 64
    layers_from: int = 1

    def __post_init__(self):
        if not 0.0 < self.tau <= 1.0:
            raise ValueError("tau must be in (0, 1]")
        if self.recent < 1 or self.random < 0:
            raise ValueError("recent must be >= 1 and random >= 0")

    def plan(self, visual, seq_len, num_layers, visual_grid=None) -> Cut:
        return ZipVLSelector(visual, seq_len, self.tau, self.recent, self.random, self.layers_from)
