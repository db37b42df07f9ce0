"""``streaming`` (StreamingLLM, Xiao et al. 2023): keep ``sinks`` attention-sink entries plus the most recent ones,
``capacity`` entries in all, after prefill and at every decode step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import KV
from .base import KVMethod


@KV.register("streaming")
@dataclass
class Streaming(KVMethod):
    capacity: int = 4096
    sinks: int = 4

    def __post_init__(self):
        if self.capacity <= self.sinks or self.sinks < 0:
            raise ValueError(f"capacity ({self.capacity}) must exceed sinks ({self.sinks}) >= 0")

    needs_queries = False

    def _trim(self, cache, layer_idx):
        n = cache.entries(layer_idx)
        if n > self.capacity:
            dev = cache.layers[layer_idx].keys.device
            idx = torch.cat([torch.arange(self.sinks, device=dev),
                             torch.arange(n - (self.capacity - self.sinks), n, device=dev)])
            cache.keep(layer_idx, idx)

    def after_prefill(self, cache, layer_idx):
        self._trim(cache, layer_idx)

    def after_decode(self, cache, layer_idx):
        self._trim(cache, layer_idx)
