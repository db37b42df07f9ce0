"""``snapkv`` (FasterDecoding/SnapKV, Li et al. 2024): after prefill, each KV head keeps the ``capacity − window``
prefix entries that the last ``window`` queries attend to most (softmax weights summed over the window's queries,
averaged over the query heads sharing the KV head, then average-pooled with ``kernel``), plus the window itself.
Decode entries are appended uncompressed, as in the paper."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention.patterns.base import column_probs
from ..registry import KV
from .base import KVMethod


def snapkv_scores(q, k, window: int, kernel: int, scale: float | None = None):
    """q [B, H, N, D], k [B, Hkv, N, D] -> float32 [B, Hkv, N − window]: pooled attention of the last ``window``
    queries to each prefix key (causal inside the window)."""
    b, h, n, _ = q.shape
    hk = k.shape[1]
    g = h // hk
    rows = torch.arange(n - window, n, device=q.device)
    p = column_probs(q[:, :, n - window:], k, rows, scale=scale)[0][..., : n - window]  # [B, H, N-window]
    p = p.view(b, hk, g, -1).mean(2)
    if kernel > 1:
        p = F.avg_pool1d(p.reshape(b * hk, 1, -1), kernel, stride=1, padding=kernel // 2,
                         count_include_pad=False).view(b, hk, -1)
    return p


@KV.register("snapkv")
@dataclass
class SnapKV(KVMethod):
    capacity: int = 4096
    window: int = 64
    kernel: int = 5

    def __post_init__(self):
        if self.window < 1 or self.capacity <= self.window:
            raise ValueError(f"capacity ({self.capacity}) must exceed window ({self.window}) >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("kernel must be a positive odd number")

    needs_queries = True

    def on_prefill_attention(self, cache, layer_idx, q, k, v, out):
        n = k.shape[2]
        if n <= self.capacity or cache.entries(layer_idx) != n:
            return
        scores = snapkv_scores(q, k, self.window, self.kernel)
        top = scores.topk(self.capacity - self.window, dim=-1).indices.sort(-1).values
        win = torch.arange(n - self.window, n, device=k.device).expand(*top.shape[:2], -1)
        cache.keep(layer_idx, torch.cat([top, win], -1))
