"""Decode attention straight from ``kivi``'s packed cache (Triton): one query token per head over the quantised keys
and values and the full-precision window, without dequantising the cache into memory.

``kv.kivi.KIVILayer`` keeps keys as ``bits``-bit codes per channel over groups of ``GT`` tokens (a scale and a
minimum per group and channel) and values as codes per token over groups of ``GV`` channels (a scale and a minimum
per token and channel group), plus a full-precision window. Dequantising all of it at every step and attending over
the result (the torch path) writes and reads the cache in the model's dtype again; here each program reads one
K/V head's codes for a range of token groups, unpacks and dequantises a tile in registers (the same multiply-add in
fp32, then the model's dtype, as the torch path), and runs an online softmax over it with the query heads that share
the K/V head as the rows of one product (GQA: 7 rows of 28/4, padded to 16). One more program per K/V head takes the
window. A second kernel merges the programs' partial sums by their maxima.

Splits: enough token-group ranges per K/V head that the grid holds about ``TARGET_PROGRAMS`` programs; the merge
takes one query head per program and reads 32 splits at a time.

Measured on an H200 (``python benchmarks/kivi_decode.py --configs 264/4,528/4,1056/4,2112/4,1056/2,1056/8
--against FILE`` with FILE the first version, ``git show 3ac8ff8:src/vidsparse/attention/kernels/kivi_decode.py``;
``kivi_decode.json``; 28/4 heads, d = 128, bf16, 2 bits, GPU µs of one call as a CUDA-graph replay) at 16K / 64K /
128K cached tokens: 28 / 73 / 127 µs, against 551 / 2,117 / 4,573 for the torch path (dequantise, then SDPA) and
24 / 50 / 80 for SDPA over the same cache in bf16 — it reads a quarter of the bytes but is bound by unpacking and
dequantising in registers, not by memory. The first version, which gathered the codes a byte per element and merged
the splits in one program per K/V head, took 258 / 798 / 1,526 µs. Programs and warps (PROGRAMS/WARPS) against 528/4: 264/4
0–4% slower; 1,056/4 and 2,112/4 9–96% slower; 1,056/2 within 3% at 64K–128K but 37% slower at 16K; 8 warps
2.3–2.6× slower."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fit import env_int

TARGET_PROGRAMS = 528  # programs of the first kernel, about four per SM of an H100 / H200
# (``VIDSPARSE_KIVI_PROGRAMS``: the A/B knob; ``VIDSPARSE_KIVI_WARPS`` its warps, 4)
BR = 32  # window tokens per tile
MERGE_SPLITS = 32  # splits the merge reads at once


@triton.jit
def _decode(Q, PK, SK, MK, PV, SV, MV, KR, VR, PO, PML, H, HK, G, NG, R, GPS, NSQ,
            s_qb, s_qh, s_pkb, s_pkh, s_pkg, s_skb, s_skh, s_skg, s_pvb, s_pvh, s_pvt, s_svb, s_svh, s_svt,
            s_rb, s_rh, s_rn, qk_scale, D: tl.constexpr, GT: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr,
            PER: tl.constexpr, LEVELS: tl.constexpr, BG: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    rows = tl.arange(0, BG)
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + (hk * G + rows[:, None]) * s_qh + d[None, :], mask=rows[:, None] < G, other=0.0)
    m = tl.full([BG], float("-inf"), tl.float32)
    l = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    t = tl.arange(0, GT)
    j = tl.arange(0, D // PER)  # a row's bytes, loaded once and unpacked in registers
    shift = (tl.arange(0, PER) * BITS).to(tl.uint8)
    c = tl.arange(0, D // GV)
    if split < NSQ:  # token groups split·GPS …: keys per channel over the group, values per token
        for g in range(split * GPS, tl.minimum((split + 1) * GPS, NG)):
            kb = tl.load(PK + b * s_pkb + hk * s_pkh + g * s_pkg + t[:, None] * (D // PER) + j[None, :])
            kc = tl.reshape((kb[:, :, None] >> shift[None, None, :]) & LEVELS, (GT, D)).to(tl.float32)
            sk = tl.load(SK + b * s_skb + hk * s_skh + g * s_skg + d).to(tl.float32)
            mk = tl.load(MK + b * s_skb + hk * s_skh + g * s_skg + d).to(tl.float32)
            k = (kc * sk[None, :] + mk[None, :]).to(Q.dtype.element_ty)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BG, GT], log2 domain
            n = g * GT + t
            vb = tl.load(PV + b * s_pvb + hk * s_pvh + n[:, None] * s_pvt + j[None, :])
            vc = tl.reshape((vb[:, :, None] >> shift[None, None, :]) & LEVELS, (GT, D // GV, GV)).to(tl.float32)
            so = b * s_svb + hk * s_svh + n[:, None] * s_svt + c[None, :]  # [GT, D/GV]: per token and group
            v = vc * tl.load(SV + so).to(tl.float32)[:, :, None] + tl.load(MV + so).to(tl.float32)[:, :, None]
            v = tl.reshape(v, (GT, D)).to(Q.dtype.element_ty)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(Q.dtype.element_ty), v, input_precision=PRECISION)
            m = m_new
    else:  # the full-precision window
        for r0 in range(0, R, BR):
            n = r0 + tl.arange(0, BR)
            off = b * s_rb + hk * s_rh + n[:, None] * s_rn + d[None, :]
            kr = tl.load(KR + off, mask=n[:, None] < R, other=0.0)
            s = tl.dot(q, tl.trans(kr), input_precision=PRECISION) * qk_scale
            s = tl.where(n[None, :] < R, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_sub)
            p = tl.exp2(s - m_sub[:, None])
            l = l * alpha + tl.sum(p, 1)
            vr = tl.load(VR + off, mask=n[:, None] < R, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(Q.dtype.element_ty), vr, input_precision=PRECISION)
            m = m_new
    base = bhk * (NSQ + 1) + split
    tl.store(PO + (base * BG + rows[:, None]) * D + d[None, :], acc)
    tl.store(PML + (base * 2) * BG + rows, m)
    tl.store(PML + (base * 2 + 1) * BG + rows, l)


@triton.jit
def _merge(PO, PML, OUT, H, G, NS, s_ob, s_oh, D: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr):
    """One query head per program: its row of every split's partial sums, rescaled to their common max and
    normalised, ``BS`` splits at a time."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    bhk = pid // G  # = b·HK + h // G
    row = h % G
    sp = tl.arange(0, BS)
    d = tl.arange(0, D)
    m = tl.max(tl.full([BS], float("-inf"), tl.float32), 0)
    for s0 in range(0, NS, BS):
        base = bhk * NS + s0 + sp
        m = tl.maximum(m, tl.max(tl.load(PML + (base * 2) * BG + row, mask=s0 + sp < NS, other=float("-inf")), 0))
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, D], tl.float32)
    for s0 in range(0, NS, BS):
        ok = s0 + sp < NS
        base = bhk * NS + s0 + sp
        w = tl.exp2(tl.load(PML + (base * 2) * BG + row, mask=ok, other=float("-inf")) - m_sub)
        l += w * tl.load(PML + (base * 2 + 1) * BG + row, mask=ok, other=0.0)
        acc += w[:, None] * tl.load(PO + (base[:, None] * BG + row) * D + d[None, :], mask=ok[:, None], other=0.0)
    tot = tl.sum(l, 0)
    out = tl.sum(acc, 0) / tl.where(tot > 0.0, tot, 1.0)
    tl.store(OUT + b * s_ob + h * s_oh + d, out.to(OUT.dtype.element_ty))


def kivi_decode_attention(q: torch.Tensor, layer, scale: float | None = None) -> torch.Tensor:
    """q [B, H, 1, D] (one decode token per head) over a ``kv.kivi.KIVILayer``'s quantised tokens and its window
    (which holds this step's token) -> [B, H, 1, D] in q's dtype. The kernels (CUDA, or the CPU under
    TRITON_INTERPRET=1); ``kivi_decode_reference`` is the torch path."""
    b, h, nq, d = q.shape
    if nq != 1:
        raise ValueError(f"kivi_decode_attention: one query token per head, not {nq}")
    hk = layer.keys.shape[1]
    g = h // hk
    bg = max(16, triton.next_power_of_2(g))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q.reshape(b, h, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    kr, vr = (x if x.stride(-1) == 1 else x.contiguous() for x in (layer.keys, layer.values))
    r = kr.shape[2]
    ng = layer.quantized // layer.group
    if ng:
        pk, sk, mk = layer.qk
        pv, sv, mv = layer.qv
        pv = pv.reshape(b, hk, pv.shape[2], -1)  # [B, HK, T, D·bits/8]: the channel groups' bytes in a row
        gps = max(1, triton.cdiv(ng * b * hk, env_int("VIDSPARSE_KIVI_PROGRAMS", TARGET_PROGRAMS)))
        nsq = triton.cdiv(ng, gps)
    else:  # nothing quantised yet: the window alone (placeholder pointers)
        pk = sk = mk = pv = sv = mv = kr
        gps, nsq = 1, 0
    ns = nsq + 1
    po = torch.empty(b * hk * ns * bg * d, dtype=torch.float32, device=q.device)
    pml = torch.empty(b * hk * ns * 2 * bg, dtype=torch.float32, device=q.device)
    st = (lambda x, n: x.stride()[:n]) if ng else (lambda x, n: (0,) * n)
    _decode[(b * hk, ns)](q, pk, sk, mk, pv, sv, mv, kr, vr, po, pml, h, hk, g, ng, r, gps, nsq,
                          q.stride(0), q.stride(1), *st(pk, 3), *st(sk, 3), *st(pv, 3), *st(sv, 3),
                          kr.stride(0), kr.stride(1), kr.stride(2), scale * 1.4426950408889634, D=d,
                          GT=layer.group, GV=layer.vgroup, BITS=layer.bits, PER=8 // layer.bits,
                          LEVELS=(1 << layer.bits) - 1, BG=bg, BR=BR,
                          PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                          num_warps=env_int("VIDSPARSE_KIVI_WARPS", 4, 1, pow2=True))
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    _merge[(b * h,)](po, pml, out, h, g, ns, out.stride(0), out.stride(1), D=d, BG=bg, BS=MERGE_SPLITS, num_warps=4)
    return out


def kivi_decode_reference(q: torch.Tensor, layer, scale: float | None = None) -> torch.Tensor:
    """The torch path: the layer's quantised part dequantised (``KIVILayer.dequantized``), the window after it,
    and SDPA with GQA. q [B, H, 1, D] -> [B, H, 1, D]."""
    dk, dv = layer.dequantized()
    k = torch.cat([dk, layer.keys], 2)
    v = torch.cat([dv, layer.values], 2)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
