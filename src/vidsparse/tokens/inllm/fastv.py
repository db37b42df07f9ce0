"""``fastv`` (pkunlp-icler/FastV, Chen et al. 2024): after layer ``k``, keep the visual tokens that the last token
attends to most in layer ``k − 1`` (softmax row averaged over heads) and drop the lowest fraction ``r``.

Only layer ``k − 1``'s last attention row is computed (O(N)), from the post-RoPE q/k the vidsparse attention function
already has; the reference repo switches the whole model to eager attention to get it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.hf import last_query_attention
from ...registry import INLLM
from .base import Cut, InLLMReducer


class FastVCut(Cut):
    def __init__(self, visual, seq_len, layer: int, keep_visual: int):
        super().__init__(visual, seq_len)
        self.layer, self.keep_visual = layer, keep_visual

    def on_prefill_attention(self, layer_idx, q, k, v, out):
        if layer_idx != self.layer - 1 or q.shape[2] != self.current:
            return
        self.cut(rank_keep(last_query_attention(q, k)[0], self.visual_columns().to(q.device), self.keep_visual))


def rank_keep(scores, is_visual, keep_visual: int):
    """Sorted current-sequence columns: every non-visual column plus the ``keep_visual`` top-scoring visual ones."""
    vis = torch.nonzero(is_visual).squeeze(1)
    keep_visual = min(keep_visual, int(vis.numel()))
    top = vis[scores[vis].topk(keep_visual).indices]
    return torch.cat([torch.nonzero(~is_visual).squeeze(1), top]).sort().values


def visual_keep_count(n_visual: int, r: float) -> int:
    return max(1, n_visual - int(round(r * n_visual))) if n_visual else 0


@INLLM.register("fastv")
@dataclass
class FastV(InLLMReducer):
    """k: the layer whose input is pruned (attention of layer k−1 ranks); r: fraction of visual tokens dropped."""

    k: int = 2
    r: float = 0.5

    def __post_init__(self):
        if self.k < 1:
            raise ValueError("k must be >= 1 (layer k-1's attention ranks the tokens)")
        if not 0.0 <= self.r < 1.0:
            raise ValueError("r must be in [0, 1)")

    def plan(self, visual, seq_len, num_layers, visual_grid=None) -> Cut:
        if self.k >= num_layers:
            raise ValueError(f"fastv k={self.k} but the model has {num_layers} layers")
        return FastVCut(visual, seq_len, self.k, visual_keep_count(visual[1] - visual[0], self.r))
