"""Block-sparse flash-attention forward in Triton: executes any ``BlockLayout``.

One program per (query block, batch·head). It walks the query block's key-block list (from the layout), keeps the
online-softmax running max/sum in fp32 and accumulates P·V with tensor-core dots. GQA reads the shared K/V head in
place (no expansion). The element mask (causal triangle, sequence ends) is applied only on blocks that need it,
decided from geometry in the kernel, so the layout's blocks may come from any pattern. Rows with no key get 0."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _configs():
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, IDX, CNT, LQ, LK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_ib, s_ih, s_im, s_ik,
    s_cb, s_ch, s_cm,
    H, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    lq = tl.load(LQ + b)
    lk = tl.load(LK + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    if pid_m * BLOCK_M >= lq:
        return
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=offs_m[:, None] < lq, other=0.0)
    q = (q * qk_scale).to(q.dtype)  # softmax scale and log2(e) folded into Q once
    cnt = tl.load(CNT + b * s_cb + h * s_ch + pid_m * s_cm)
    idx_base = IDX + b * s_ib + h * s_ih + pid_m * s_im
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    off = lk - lq  # bottom-right causal alignment
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, cnt):
        n = tl.load(idx_base + j * s_ik)
        start_n = n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=offs_n[:, None] < lk, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=offs_n[:, None] < lk, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        # Only blocks that cross the causal diagonal or a sequence end need the element mask.
        partial = (start_n + BLOCK_N > lk) | (pid_m * BLOCK_M + BLOCK_M > lq)
        if CAUSAL:
            partial = partial | (start_n + BLOCK_N - 1 > pid_m * BLOCK_M + off)
        if partial:
            valid = offs_n[None, :] < lk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < lq)


_TUNED = []


def _kernel(cuda: bool):
    """The autotuned kernel on CUDA; the plain one in the interpreter, whose autotuner has no benchmarker."""
    if not cuda:
        return _block_sparse_fwd
    if not _TUNED:
        _TUNED.append(triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL"])(_block_sparse_fwd))
    return _TUNED[0]


def block_sparse_attention(q, k, v, kv_index, kv_count, block_q: int, block_k: int, causal: bool,
                           scale: float | None, seqlens_q=None, seqlens_k=None):
    """q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; kv_index int32 [B|1, H|1, NQ, K]; kv_count int32 [B|1, H|1, NQ]."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head dim {d} is not supported by the kernel (16, 32, 64, 128)")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros_like(q)  # rows past a sequence's length stay 0
    lq = seqlens_q.to(torch.int32) if seqlens_q is not None else torch.full((b,), nq, dtype=torch.int32, device=q.device)
    lk = seqlens_k.to(torch.int32) if seqlens_k is not None else torch.full((b,), nk, dtype=torch.int32, device=q.device)
    si = [kv_index.stride(i) if kv_index.shape[i] > 1 else 0 for i in range(4)]
    sc = [kv_count.stride(i) if kv_count.shape[i] > 1 else 0 for i in range(3)]
    grid = (triton.cdiv(nq, block_q), b * h)
    _kernel(q.is_cuda)[grid](
        q, k, v, out, kv_index, kv_count, lq, lk,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *si, *sc,
        h, h // hk, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_q, BLOCK_N=block_k, CAUSAL=causal,
    )
    return out
