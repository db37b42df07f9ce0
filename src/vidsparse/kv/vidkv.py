"""``vidkv`` (VidKV, Tao et al. 2025, KD-TAO/VidKV): the KV cache of a video LLM in about 1.5 bits per key entry and
1.58 (stored as 2) per value entry, in groups of ``group`` consecutive tokens, the most recent tokens in full
precision (the residual window, as ``kivi``'s: ``residual`` to ``residual + group − 1`` tokens).

Keys, per group and K/V head: channels ranked by their range (max − min over the group's tokens). The top
``key_bits − 1`` of them (half at 1.5 bits: the anomalous channels) get 2-bit min–max codes per channel; the rest go
through an FFT along the channel axis (``torch.fft.rfft`` over those channels, in channel order), and each real and
imaginary coefficient keeps only its sign, scaled by the mean magnitude of that coefficient over the group's tokens —
as many sign bits as those channels (the imaginary parts that are zero by symmetry are not stored). Values, per
channel over the group: ternary codes {−1, 0, +1} (|x| above or below half the channel's mean |x|), scaled by the
mean |x| of the entries coded ±1 (the least-squares scale for that support; the paper's text gives the threshold,
not the scale). Which channels were anomalous is stored as a bitmask per group.

Not here: the paper's protection of semantically salient visual tokens in the value cache, and a fused kernel (decode
steps dequantise the cache in torch, FFT included, so this saves memory, not time). Scales are float16 for float16
models and float32 otherwise, as ``kivi``'s; ``nbytes`` counts what is stored."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UnsupportedError
from ..registry import KV
from .kivi import KIVILayer, WindowedKV, dequantize, mask_split, pack, quantize, unpack


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x [..., G, D] at channels idx [..., C] (per group) -> [..., G, C]."""
    return torch.gather(x, -1, idx[..., None, :].expand(*idx.shape[:-1], x.shape[-2], idx.shape[-1]))


def fft_signs(x: Tensor) -> tuple[Tensor, Tensor]:
    """x float32 [..., G, C] -> (signs bool [..., G, C]: the rfft's real parts ≥ 0 then its imaginary parts ≥ 0 that
    are not zero by symmetry; scales [..., 2, F]: the mean magnitude over the G tokens of each real and imaginary
    coefficient, F = C // 2 + 1; none for C = 0)."""
    c = x.shape[-1]
    if c == 0:  # every channel 2-bit (key_bits 2)
        return x.new_zeros(x.shape, dtype=torch.bool), x.new_zeros(*x.shape[:-2], 2, 0)
    f = torch.fft.rfft(x, dim=-1)
    im_kept = slice(1, f.shape[-1] - 1 if c % 2 == 0 else f.shape[-1])  # DC's, and Nyquist's for even C, are 0
    signs = torch.cat([f.real >= 0, f.imag[..., im_kept] >= 0], -1)
    scales = torch.stack([f.real.abs().mean(-2), f.imag.abs().mean(-2)], -2)
    return signs, scales


def fft_restore(signs: Tensor, scales: Tensor, c: int) -> Tensor:
    """``fft_signs``' inverse: ±scale per coefficient, the inverse rfft over C channels -> float32 [..., G, C]."""
    if c == 0:
        return scales.new_zeros(*signs.shape)
    nf = c // 2 + 1
    sgn = signs.float() * 2 - 1
    re = sgn[..., :nf] * scales[..., None, 0, :]
    im = torch.zeros_like(re)
    kept = nf - 2 if c % 2 == 0 else nf - 1
    im[..., 1:1 + kept] = sgn[..., nf:] * scales[..., None, 1, 1:1 + kept]
    return torch.fft.irfft(torch.complex(re, im), n=c, dim=-1)


def ternary(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """x float32 -> (codes int8 in {−1, 0, +1}: beyond ±half the mean |x| along ``dim``; scale along ``dim`` kept as
    1: the mean |x| of the entries coded ±1, 0 where none is)."""
    a = x.abs()
    thr = 0.5 * a.mean(dim, keepdim=True)
    t = (x > thr).to(torch.int8) - (x < -thr).to(torch.int8)
    nz = t != 0
    scale = (a * nz).sum(dim, keepdim=True) / nz.sum(dim, keepdim=True).clamp(min=1)
    return t, scale


class VidKVLayer(KIVILayer):
    """A transformers cache layer holding VidKV's codes plus the full-precision window (see the module)."""

    fusable = False

    def __init__(self, key_bits: float = 1.5, group: int = 32, residual: int = 128):
        super().__init__(2, group, residual)
        self.key_bits = key_bits

    def _check(self, d: int) -> None:
        self.hi = int(round((self.key_bits - 1) * d))
        if d % 8 or self.hi % 4 or (d - self.hi) % 8:
            raise UnsupportedError(f"vidkv: head dim {d} with {self.hi} two-bit channels does not pack (the 2-bit "
                                   "channels a multiple of 4, the others of 8); choose key_bits accordingly")

    def _encode(self, k: Tensor, v: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        b, h, n, d = k.shape
        m, g = n // self.group, self.group
        kg = k.reshape(b, h, m, g, d).float()
        rng = kg.amax(3) - kg.amin(3)  # [B, H, m, D]
        top = torch.argsort(rng, dim=-1, descending=True, stable=True)[..., : self.hi]
        mask = torch.zeros_like(rng, dtype=torch.bool).scatter_(-1, top, True)
        hi_idx, lo_idx = mask_split(mask, self.hi)
        codes, scale, mn = quantize(_take(kg, hi_idx), 2, 3, self.meta_dtype)
        signs, fscale = fft_signs(_take(kg, lo_idx))
        qk = (pack(mask.to(torch.uint8), 1), pack(codes, 2), scale.squeeze(3), mn.squeeze(3), pack(signs, 1),
              fscale.to(self.meta_dtype))
        t, vscale = ternary(v.reshape(b, h, m, g, d).float(), 3)
        return qk, (pack((t + 1).to(torch.uint8), 2), vscale.squeeze(3).to(self.meta_dtype))

    def dequantized(self) -> tuple[Tensor, Tensor]:
        if self.qk is None:
            return self.keys[..., :0, :], self.values[..., :0, :]
        pmask, pcodes, scale, mn, psigns, fscale = self.qk
        b, h, m, g, _ = pcodes.shape
        d = pmask.shape[-1] * 8
        hi_idx, lo_idx = mask_split(unpack(pmask, 1).bool(), self.hi)
        hi = dequantize(unpack(pcodes, 2), scale[:, :, :, None, :], mn[:, :, :, None, :], torch.float32)
        lo = fft_restore(unpack(psigns, 1), fscale.float(), d - self.hi)
        k = torch.empty(b, h, m, g, d, dtype=torch.float32, device=pcodes.device)
        k.scatter_(-1, hi_idx[..., None, :].expand(b, h, m, g, self.hi), hi)
        k.scatter_(-1, lo_idx[..., None, :].expand(b, h, m, g, d - self.hi), lo)
        pv, vscale = self.qv
        v = (unpack(pv, 2).float() - 1) * vscale[:, :, :, None, :].float()
        dt = self.keys.dtype
        return k.reshape(b, h, m * g, d).to(dt), v.reshape(b, h, m * g, d).to(dt)


@KV.register("vidkv")
@dataclass
class VidKV(WindowedKV):
    key_bits: float = 1.5

    layer = VidKVLayer

    def __post_init__(self):
        super().__post_init__()
        if not 1.0 <= self.key_bits <= 2.0:
            raise ValueError(f"key_bits must lie in [1, 2] (1 + the share of 2-bit channels), not {self.key_bits}")
