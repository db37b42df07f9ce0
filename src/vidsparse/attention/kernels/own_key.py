"""Fold each query's own key into an attention output through its log-sum-exp, in one pass (Triton).

``key_subset_attention`` (the ZipVL execution path) runs the block kernel over the kept keys only; query i must also
see its own key i when that key was not kept. With the row's output o and natural-log log-sum-exp ℓ over the kept
keys it saw, and s = scale · q_i·k_i, the own key's share of the row's softmax mass is w = σ(s − ℓ) (1 when the row saw
nothing, ℓ = −∞), and the row's output becomes (1 − w) · o + w · v_i.

The torch version of this step (an einsum, a sigmoid and a lerp; the baseline of ``benchmarks/key_subset.py``, and
in fp32 the tests' oracle ``reference.fold_own_key``) made fp32 copies of q and k, a [B, H, N] score tensor, a weight
tensor and the lerp's output: about eight passes over tensors of q's size. Here each program reads the rows it folds
(q, its K/V head's k and v, o and ℓ) once and writes o in place; rows whose own key was kept are neither read nor
written (their loads are masked off), so the traffic falls with the kept fraction. The dot product and the blend run
in fp32; o is rounded once, to its dtype, on the store.

Measured on an H200 (``benchmarks/key_subset.py``, 28 heads / 4 K/V heads, d = 128, bf16): with half the keys kept,
0.70 → 0.067 ms at 16K tokens and 5.32 → 0.60 ms at 128K (about 2.6–3.1 TB/s of the bytes the folded rows need);
8.9–13.3× over 16K–128K and 50% or 94% of the keys. Offsets: an int64 base per program, int32 within it (0.94× /
0.96× the time of int64 offsets everywhere at 16K / 128K; int32 offsets alone wrap past 2^31 elements)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BN = 32  # query rows per program


@triton.jit
def _fold_own_key(Q, K, V, O, LSE, KEPT, H, G, N, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn,
                  s_vd, s_ob, s_oh, s_on, s_od, s_lb, s_lh, scale, D: tl.constexpr, BD: tl.constexpr,
                  BN: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 bases (q of 28 heads at 600K tokens passes 2^31 elements), int32 offsets
    h = (bh % H).to(tl.int64)
    hk = h // G
    r0 = (t * BN).to(tl.int64)
    loc = tl.arange(0, BN)
    rows = t * BN + loc
    dd = tl.arange(0, BD)
    kept = tl.load(KEPT + rows, mask=rows < N, other=1)
    fold = (rows < N) & (kept == 0)
    m2 = fold[:, None] & (dd[None, :] < D)
    r2, d2 = loc[:, None], dd[None, :]
    q = tl.load(Q + (b * s_qb + h * s_qh + r0 * s_qn) + r2 * s_qn + d2 * s_qd, mask=m2, other=0.0).to(tl.float32)
    k = tl.load(K + (b * s_kb + hk * s_kh + r0 * s_kn) + r2 * s_kn + d2 * s_kd, mask=m2, other=0.0).to(tl.float32)
    s = tl.sum(q * k, 1) * scale
    lse = tl.load(LSE + (b * s_lb + h * s_lh) + rows, mask=fold, other=0.0)
    w = 1.0 / (1.0 + tl.exp(lse - s))  # σ(s − ℓ): 1 where the row saw nothing (ℓ = −∞)
    wc = 1.0 / (1.0 + tl.exp(s - lse))  # 1 − w = σ(ℓ − s), without the cancellation: 0 there, so o becomes v exactly
    v = tl.load(V + (b * s_vb + hk * s_vh + r0 * s_vn) + r2 * s_vn + d2 * s_vd, mask=m2, other=0.0).to(tl.float32)
    optr = O + (b * s_ob + h * s_oh + r0 * s_on) + r2 * s_on + d2 * s_od
    o = tl.load(optr, mask=m2, other=0.0).to(tl.float32)
    o = o * wc[:, None] + v * w[:, None]
    tl.store(optr, o.to(O.dtype.element_ty), mask=m2)


def fold_own_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 kept: torch.Tensor, scale: float) -> torch.Tensor:
    """Fold query i's own key (k/v row i of its K/V head) into ``out`` in place wherever ``kept[i]`` is False, using
    ``lse`` (the natural-log log-sum-exp of the scores ``out`` was computed over; −∞ for a row that saw nothing, whose
    output becomes v_i). q/out [B, H, N, D], k/v [B, Hkv, N, D] (H a multiple of Hkv), lse [B, H, N] fp32, kept [N]
    bool. Returns ``out``."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    if out.shape != q.shape or k.shape[2] < n or lse.shape != (b, h, n) or kept.shape != (n,) or h % hk:
        raise ValueError(f"fold_own_key: q {tuple(q.shape)}, k {tuple(k.shape)}, out {tuple(out.shape)}, "
                         f"lse {tuple(lse.shape)}, kept {tuple(kept.shape)}")
    if n == 0 or b * h == 0:
        return out
    if lse.stride(2) != 1:
        lse = lse.contiguous()
    grid = (triton.cdiv(n, BN), b * h)
    _fold_own_key[grid](q, k, v, out, lse, kept.contiguous().view(torch.uint8), h, h // hk, n, *q.stride(), *k.stride(),
                        *v.stride(), *out.stride(), lse.stride(0), lse.stride(1), float(scale), D=d,
                        BD=triton.next_power_of_2(d), BN=BN, num_warps=4)
    return out
