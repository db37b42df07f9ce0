"""Block-sparse flash-attention forward in Triton: executes any ``BlockLayout``.

One program per (query head, query block). It walks the query block's key-block list (from the layout), keeps the
online-softmax running max/sum in fp32 and accumulates P·V with tensor-core dots. GQA reads the shared K/V head in
place (no expansion). Because a row's block indices are sorted, the blocks needing no element mask (inside the causal
triangle and both sequence ends) form a prefix, counted per row from geometry by ``full_prefix``; the kernel runs
that prefix in a mask-free loop and only the rest (the diagonal, ragged ends) with the element mask. Rows with no
key get 0."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _configs():
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, idx_base, j0, j1, s_ik, s_kn, s_kd, s_vn, s_vd, offs_m, offs_d, lk, off,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for j in range(j0, j1):
        n = tl.load(idx_base + j * s_ik)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASK:
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=offs_n[:, None] < lk, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=offs_n[:, None] < lk, other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd)
            v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd)
        qk = tl.dot(q, tl.trans(k))
        if MASK:
            valid = offs_n[None, :] < lk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in the MMA
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, IDX, CNT, NFULL, LQ, LK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_ib, s_ih, s_im, s_ik,
    s_cb, s_ch, s_cm,
    s_fb, s_fh, s_fm,
    H, HK, GROUP, NQB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    # Launch order: the GROUP query heads that share a K/V head vary fastest, then query blocks (longest causal rows
    # first, so short ones fill the tail), then K/V heads and batch: neighbours in time read the same K/V from L2.
    pid_g = tl.program_id(0) % GROUP
    pid_m = NQB - 1 - tl.program_id(0) // GROUP
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    h = hk * GROUP + pid_g
    lq = tl.load(LQ + b)
    lk = tl.load(LK + b)
    if pid_m * BLOCK_M >= lq:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=offs_m[:, None] < lq, other=0.0)
    q = (q * qk_scale).to(q.dtype)  # softmax scale and log2(e) folded into Q once
    cnt = tl.load(CNT + b * s_cb + h * s_ch + pid_m * s_cm)
    nfull = tl.load(NFULL + b * s_fb + h * s_fh + pid_m * s_fm)
    idx_base = IDX + b * s_ib + h * s_ih + pid_m * s_im
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    off = lk - lq  # bottom-right causal alignment
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Sorted indices make the blocks that need no element mask a prefix: run it without masks, then the rest.
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, idx_base, 0, nfull, s_ik, s_kn, s_kd, s_vn, s_vd,
                            offs_m, offs_d, lk, off, False, CAUSAL, BLOCK_N)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, idx_base, nfull, cnt, s_ik, s_kn, s_kd, s_vn, s_vd,
                            offs_m, offs_d, lk, off, True, CAUSAL, BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < lq)


def full_prefix(kv_index, kv_count, block_q: int, block_k: int, causal: bool, lq, lk):
    """int32 [B, H, NQ]: how many leading (sorted) blocks of each row need no element mask for each sequence's
    lengths. Pure tensor ops, no host sync."""
    nqb = kv_index.shape[2]
    m = torch.arange(nqb, device=kv_index.device)
    lk_ = lk.view(-1, 1, 1, 1).long()
    last_full = (lk_ // block_k) - 1  # key blocks entirely inside the sequence
    if causal:
        off = (lk - lq).view(-1, 1, 1, 1).long()
        diag = (m.view(1, 1, -1, 1) * block_q + off + 1) // block_k - 1  # blocks entirely at or below row m*bq
        last_full = torch.minimum(last_full, diag)
    valid = torch.arange(kv_index.shape[-1], device=kv_index.device) < kv_count[..., None]
    return ((kv_index.long() <= last_full) & valid).sum(-1, dtype=torch.int32)


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
    nfull = full_prefix(kv_index, kv_count, block_q, block_k, causal, lq, lk)
    si = [kv_index.stride(i) if kv_index.shape[i] > 1 else 0 for i in range(4)]
    sc = [kv_count.stride(i) if kv_count.shape[i] > 1 else 0 for i in range(3)]
    sf = [nfull.stride(i) if nfull.shape[i] > 1 else 0 for i in range(3)]
    nqb = triton.cdiv(nq, block_q)
    grid = ((h // hk) * nqb, b * hk)
    _kernel(q.is_cuda)[grid](
        q, k, v, out, kv_index, kv_count, nfull, lq, lk,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *si, *sc, *sf,
        h, hk, h // hk, nqb, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_q, BLOCK_N=block_k, CAUSAL=causal,
    )
    return out


@triton.jit
def _block_sparse_fwd_tma(
    desc_q, desc_k, desc_v, O, IDX, CNT, NFULL, LQ, LK,
    s_ob, s_oh, s_om, s_od,
    s_ib, s_ih, s_im, s_ik,
    s_cb, s_ch, s_cm,
    s_fb, s_fh, s_fm,
    H, HK, GROUP, NQB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """As ``_block_sparse_fwd`` with Q/K/V tiles brought in by the tensor-memory accelerator (3-D descriptors over
    [B·heads, N, D], zero-filled past N) and, optionally, warp-specialised pipelining of the main loop."""
    pid_g = tl.program_id(0) % GROUP
    pid_m = NQB - 1 - tl.program_id(0) // GROUP
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    h = hk * GROUP + pid_g
    pid_bh = b * H + h
    lq = tl.load(LQ + b)
    lk = tl.load(LK + b)
    if pid_m * BLOCK_M >= lq:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = desc_q.load([pid_bh, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    q = (q * qk_scale).to(q.dtype)
    cnt = tl.load(CNT + b * s_cb + h * s_ch + pid_m * s_cm)
    nfull = tl.load(NFULL + b * s_fb + h * s_fh + pid_m * s_fm)
    idx_base = IDX + b * s_ib + h * s_ih + pid_m * s_im
    kv_bh = b * HK + hk
    off = lk - lq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in tl.range(0, nfull, warp_specialize=WARP_SPEC):
        n = tl.load(idx_base + j * s_ik)
        k = desc_k.load([kv_bh, n * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([kv_bh, n * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in the MMA
        m_i = m_new
    for j in range(nfull, cnt):
        n = tl.load(idx_base + j * s_ik)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = desc_k.load([kv_bh, n * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([kv_bh, n * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        valid = offs_n[None, :] < lk
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in the MMA
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < lq)


def block_sparse_attention_tma(q, k, v, kv_index, kv_count, block_q, block_k, causal, scale, seqlens_q=None,
                               seqlens_k=None, warp_specialize=False, num_warps=8, num_stages=3):
    """TMA variant (Hopper+). q, k, v must be contiguous [B, H, N, D]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.zeros_like(q)
    lq = seqlens_q.to(torch.int32) if seqlens_q is not None else torch.full((b,), nq, dtype=torch.int32, device=q.device)
    lk = seqlens_k.to(torch.int32) if seqlens_k is not None else torch.full((b,), nk, dtype=torch.int32, device=q.device)
    nfull = full_prefix(kv_index, kv_count, block_q, block_k, causal, lq, lk)
    dq = TensorDescriptor(q.view(b * h, nq, d), [b * h, nq, d], [nq * d, d, 1], [1, block_q, d])
    dk = TensorDescriptor(k.view(b * hk, nk, d), [b * hk, nk, d], [nk * d, d, 1], [1, block_k, d])
    dv = TensorDescriptor(v.view(b * hk, nk, d), [b * hk, nk, d], [nk * d, d, 1], [1, block_k, d])
    si = [kv_index.stride(i) if kv_index.shape[i] > 1 else 0 for i in range(4)]
    sc = [kv_count.stride(i) if kv_count.shape[i] > 1 else 0 for i in range(3)]
    sf = [nfull.stride(i) if nfull.shape[i] > 1 else 0 for i in range(3)]
    nqb = triton.cdiv(nq, block_q)
    _block_sparse_fwd_tma[((h // hk) * nqb, b * hk)](
        dq, dk, dv, out, kv_index, kv_count, nfull, lq, lk, *out.stride(), *si, *sc, *sf,
        h, hk, h // hk, nqb, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_q, BLOCK_N=block_k, CAUSAL=causal, WARP_SPEC=warp_specialize,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
