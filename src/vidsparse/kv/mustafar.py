"""``mustafar`` (Mustafar, Joo et al. 2025, dhjoo98/mustafar): unstructured sparsity in the KV cache — each cached
token's key and value vectors keep only their ``1 − sparsity`` largest-magnitude entries (per-token magnitude
pruning, the paper's best-performing choice for both K and V), stored as a bitmap of the kept channels plus the kept
values themselves, unchanged (no quantisation). The most recent tokens stay dense (``kivi``'s residual window:
``residual`` to ``residual + group − 1`` tokens; older tokens are pruned ``group`` at a time).

The bitmap is per token (``head_dim / 8`` bytes: the paper's 64-element tiles' bitmaps, two per 128-channel vector)
and every token keeps the same number of entries, so the values need no offsets. At 70% sparsity and head dim 128 a
vector takes 16 + 2·38 = 92 bytes in bfloat16 against 256. Decode steps scatter the cache back to dense in torch at
every step (the paper's sparse attention kernel is not here): memory, not time. ``nbytes`` counts what is stored."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UnsupportedError
from ..registry import KV
from .kivi import KIVILayer, WindowedKV, mask_split, pack, unpack


def prune(x: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """x [..., D] -> (bitmap uint8 [..., D / 8]: the ``keep`` largest |x| of each vector; their values [..., keep] in
    channel order, x's dtype)."""
    top = x.abs().topk(keep, dim=-1).indices
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, top, True)
    return pack(mask.to(torch.uint8), 1), torch.gather(x, -1, mask_split(mask, keep)[0])


def unprune(bitmap: Tensor, values: Tensor) -> Tensor:
    """``prune``'s inverse: the kept values at their channels, zeros elsewhere."""
    mask = unpack(bitmap, 1).bool()
    pos = mask_split(mask, values.shape[-1])[0]
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).scatter_(-1, pos, values)


class MustafarLayer(KIVILayer):
    """A transformers cache layer holding pruned keys and values plus the dense window (see the module)."""

    fusable = False

    def __init__(self, sparsity: float = 0.7, group: int = 32, residual: int = 128):
        super().__init__(8, group, residual)
        self.sparsity = sparsity

    def _check(self, d: int) -> None:
        if d % 8:
            raise UnsupportedError(f"mustafar: head dim {d} is not a multiple of 8 (the bitmap's bytes)")
        self.keep = max(1, d - int(round(self.sparsity * d)))

    def _encode(self, k: Tensor, v: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return prune(k, self.keep), prune(v, self.keep)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        if self.qk is None:
            return self.keys[..., :0, :], self.values[..., :0, :]
        return unprune(*self.qk), unprune(*self.qv)


@KV.register("mustafar")
@dataclass
class Mustafar(WindowedKV):
    sparsity: float = 0.7

    layer = MustafarLayer

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), not {self.sparsity}")
