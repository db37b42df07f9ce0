"""``kivi`` (KIVI, Liu et al. 2024, jy-yuan/KIVI): the KV cache in ``bits``-bit asymmetric (min–max) integers — keys
per channel over groups of ``group`` consecutive tokens (a key channel's outliers stay in their own channel), values
per token over groups of ``group`` channels — with the most recent tokens in full precision (a residual window of
``residual`` to ``residual + group − 1`` tokens: whenever it reaches ``residual + group`` tokens, its oldest
``group`` tokens are quantised, so keys always quantise in whole token groups).

A prefill chunk attends in full precision to itself and to what the cache held before it (dequantised), as in the
paper; a decode step attends to the cache as stored after its update — its own token in the window. Quantised tokens
are never re-quantised (``transformers.QuantizedCache`` re-quantises its whole cache at each flush, compounding the
error); the codes are packed ``8 / bits`` to a byte, and each group's scale and minimum are stored in float16 for
float16 models and in float32 otherwise (a bfloat16 minimum of a channel with a large offset would round by more than
its range's quantisation step). At 2 bits, group 32 and head dim 128 a token's key and value take 64 + 64 bytes with
float32 metadata (48 + 48 with float16) against 512 in bfloat16.

Decode steps, two ways: inside vidsparse's attention function (``Pipeline``, ``models.hf.attention_scope`` with the
cache) on a GPU that runs the Triton kernels, a step's update returns the window alone and the attention function
reads the packed codes itself (``attention.kernels.kivi_decode``: no dequantised copy of the cache is ever
written); anywhere else (transformers' ``generate``, other attention functions, the CPU) the update dequantises the
whole cache in torch and returns it, which saves memory but not time (what ``QuantizedCache`` does).
``KIVICache.nbytes`` counts what it stores."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import UnsupportedError
from ..registry import KV
from .base import KVMethod

BITS = (1, 2, 4, 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., n], each < 2**bits, n a multiple of 8 / bits -> uint8 [..., n · bits / 8]: ``8 / bits``
    consecutive codes per byte, the first in the lowest bits."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """``pack``'s inverse: uint8 [..., m] -> uint8 codes [..., m · 8 / bits]."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def mask_split(mask: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """bool [..., D] with ``count`` set per row -> (the set channels' indices [..., count], the others' [..., D −
    count]), each ascending: a stable sort of the unset flags, no host sync."""
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)
    return order[..., :count], order[..., count:]


def quantize(x: Tensor, bits: int, dim: int, meta_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min–max quantisation of ``x`` along ``dim``: (codes uint8 like x, scale and minimum in
    ``meta_dtype`` with ``dim`` kept as 1). The codes are computed against the stored (rounded) scale and minimum, so
    that ``dequantize`` reproduces each value within half a step (clamped at the ends)."""
    xf = x.float()
    mn = xf.amin(dim, keepdim=True).to(meta_dtype)
    levels = (1 << bits) - 1
    scale = ((xf.amax(dim, keepdim=True) - mn.float()) / levels).to(meta_dtype)
    step = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = ((xf - mn.float()) / step).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, mn


def dequantize(codes: Tensor, scale: Tensor, mn: Tensor, dtype: torch.dtype) -> Tensor:
    return (codes.float() * scale.float() + mn.float()).to(dtype)


def _layer_base():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class KIVILayer(_layer_base()):
    """A transformers cache layer holding KIVI's quantised keys and values plus the full-precision residual window
    (``keys`` / ``values``, as a ``DynamicLayer`` holds its tensors; ``get_seq_length`` counts both parts)."""

    is_croppable = False  # a crop into the quantised part cannot be undone without the original values
    fusable = True  # its decode steps may go to ``attention.kernels.kivi_decode`` (a subclass's codes may not)

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128):
        super().__init__()
        self.bits, self.group, self.residual = bits, group, residual
        self.quantized = 0  # tokens in the quantised part
        self.fused = "off"  # decode steps: "off" (dequantise, return everything), "auto" (on a GPU that runs the
        # Triton kernels, return the window alone; vidsparse's attention function reads the rest with
        # ``attention.kernels.kivi_decode``), "kernel" (that, also on the CPU under TRITON_INTERPRET=1: tests)
        self.fused_step = False  # whether the last update returned the window alone
        # keys: codes [B, H, T/G, G, D·bits/8], scale and min [B, H, T/G, D]; values: codes [B, H, T, D/g,
        # g·bits/8], scale and min [B, H, T, D/g] (T the quantised tokens, G = group, g the value group)
        self.qk: tuple[Tensor, Tensor, Tensor] | None = None
        self.qv: tuple[Tensor, Tensor, Tensor] | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.meta_dtype = torch.float16 if key_states.dtype == torch.float16 else torch.float32
        self._check(key_states.shape[-1])

    def _check(self, d: int) -> None:
        """``UnsupportedError`` unless head dim ``d`` packs (called once, at the first update)."""
        per = 8 // self.bits
        self.vgroup = min(self.group, d)
        if d % per or d % self.vgroup or self.vgroup % per:
            raise UnsupportedError(f"kivi: head dim {d} does not split into value groups of {self.vgroup} channels "
                                   f"packed {per} to a byte; choose a group that divides it (e.g. kivi:group=16)")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = key_states.shape[-2] == 1 and self.get_seq_length() > 0  # a decode step
        self.fused_step = False
        if not step:  # a prefill chunk: what the cache held (dequantised), then the chunk, in full precision
            if self.quantized:
                dk, dv = self.dequantized()
                ret = (torch.cat([dk, self.keys, key_states], -2), torch.cat([dv, self.values, value_states], -2))
            elif self.keys.numel():
                ret = (torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2))
            else:
                ret = (key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        r = self.keys.shape[-2]
        if r >= self.residual + self.group:
            self._quantize_oldest((r - self.residual) // self.group * self.group)
        if not step:
            return ret
        # a decode step attends to the cache as stored after it (its own token in the window)
        if self.fused != "off" and fused_supported(self, key_states, self.fused == "kernel"):
            self.fused_step = True  # the attention function reads the quantised part itself (``kivi_decode``)
            return self.keys, self.values
        dk, dv = self.dequantized()
        return torch.cat([dk, self.keys], -2), torch.cat([dv, self.values], -2)

    def _quantize_oldest(self, n: int) -> None:
        """Moves the residual window's oldest ``n`` tokens (a multiple of ``group``) into the quantised part."""
        k, v = self.keys[..., :n, :], self.values[..., :n, :]
        # copies, so that the full-precision storage of the quantised tokens is freed
        self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()
        qk, qv = self._encode(k, v)
        if self.qk is None:
            self.qk, self.qv = qk, qv
        else:
            self.qk = tuple(torch.cat([a, x], 2) for a, x in zip(self.qk, qk))
            self.qv = tuple(torch.cat([a, x], 2) for a, x in zip(self.qv, qv))
        self.quantized += n

    def _encode(self, k: Tensor, v: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Keys and values [B, H, n, D] (n a multiple of ``group``) -> the stored tensors of each, their dim 2 along
        the tokens (or token groups), so that later blocks concatenate there."""
        b, h, n, d = k.shape
        codes, scale, mn = quantize(k.reshape(b, h, n // self.group, self.group, d), self.bits, 3, self.meta_dtype)
        qk = (pack(codes, self.bits), scale.squeeze(3), mn.squeeze(3))
        g = self.vgroup
        codes, scale, mn = quantize(v.reshape(b, h, n, d // g, g), self.bits, 4, self.meta_dtype)
        return qk, (pack(codes, self.bits), scale.squeeze(4), mn.squeeze(4))

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """The quantised part's keys and values, [B, H, quantized, D] each in the model's dtype."""
        if self.qk is None:
            return self.keys[..., :0, :], self.values[..., :0, :]
        pk, sk, mk = self.qk
        b, h, m, gsz, _ = pk.shape
        dt = self.keys.dtype
        k = dequantize(unpack(pk, self.bits), sk[:, :, :, None, :], mk[:, :, :, None, :], dt).reshape(b, h, m * gsz, -1)
        pv, sv, mv = self.qv
        v = dequantize(unpack(pv, self.bits), sv[..., None], mv[..., None], dt).reshape(b, h, pv.shape[2], -1)
        return k, v

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized + self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes stored: the packed codes, their scales and minima, and the residual window."""
        parts = [self.keys, self.values] if self.is_initialized else []
        for q in (self.qk, self.qv):
            if q is not None:
                parts.extend(q)
        return int(sum(t.numel() * t.element_size() for t in parts))

    def _each(self, fn) -> None:
        """Applies ``fn`` (batch dimension first) to every stored tensor."""
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.qk is not None:
            self.qk, self.qv = tuple(fn(t) for t in self.qk), tuple(fn(t) for t in self.qv)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.get_seq_length() > 0:
            self._each(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Removes ``-tokens_to_remove`` of the newest tokens, while they are all in the residual window."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, not {tokens_to_remove}")
        drop = -tokens_to_remove
        if drop == 0 or not self.is_initialized:
            return
        if drop > self.keys.shape[-2]:
            raise UnsupportedError(f"kivi: cannot remove {drop} tokens, only the {self.keys.shape[-2]} of the "
                                   "full-precision window (the rest are quantised)")
        self.keys, self.values = self.keys[..., :-drop, :], self.values[..., :-drop, :]

    def reset(self) -> None:
        self.quantized, self.qk, self.qv = 0, None, None
        super().reset()


def fused_supported(layer: KIVILayer, x: Tensor, force: bool = False) -> bool:
    """Whether ``attention.kernels.kivi_decode`` serves this layer's decode steps: a GPU that runs the Triton kernels
    (or ``force``: the CPU under TRITON_INTERPRET=1), and token groups and a head dim of 16 to 256, powers of two (the
    kernel's tiles)."""
    from ..attention.kernels.fit import kernel_device

    if not layer.fusable:
        return False
    d = x.shape[-1]
    shapes = 16 <= layer.group <= 256 and 16 <= d <= 256 and not layer.group & (layer.group - 1) and not d & (d - 1)
    return shapes and (force or kernel_device(x))


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


class KIVICache(_cache_base()):
    """A transformers ``Cache`` whose layers ``layer()`` makes (``KIVILayer`` or a subclass), usable as
    ``model.generate(..., past_key_values=cache)``."""

    def __init__(self, layer):
        super().__init__(layer_class_to_replicate=layer)
        self.fused = "off"

    def nbytes(self) -> int:
        return int(sum(layer.nbytes() for layer in self.layers))

    def entries(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def set_fused(self, mode: str) -> None:
        """How decode steps attend (``KIVILayer.fused``): "off", "auto" or "kernel". Only vidsparse's attention
        function knows to read the quantised part itself, so ``models.hf.attention_scope`` turns this on for its
        duration and off again; anything else attending to this cache must leave it "off"."""
        self.fused = mode
        for layer in self.layers:
            layer.fused = mode

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # a layer added while fused is on takes the mode too
            self.layers.append(self.layer_class_to_replicate())
            self.layers[-1].fused = self.fused
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class WindowedKV(KVMethod):
    """What ``kivi``, ``vidkv`` and ``mustafar`` share: older tokens compressed ``group`` at a time by a
    ``KIVILayer`` subclass (``layer``), the newest ``residual`` to ``residual + group − 1`` kept as they are. A
    subclass adds its own parameters (passed to ``layer`` before group and residual, in field order) and checks."""

    group: int = 32
    residual: int = 128

    layer: ClassVar[type]
    needs_queries = False

    def __post_init__(self):
        if self.group < 1 or self.residual < 0:
            raise ValueError(f"group ({self.group}) must be ≥ 1 and residual ({self.residual}) ≥ 0")

    def make_cache(self) -> KIVICache:
        own = [getattr(self, f.name) for f in fields(self) if f.name not in ("group", "residual")]
        return KIVICache(functools.partial(self.layer, *own, self.group, self.residual))


@KV.register("kivi")
@dataclass
class KIVI(WindowedKV):
    bits: int = 2

    layer = KIVILayer

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {self.bits}")
