"""Block-sparse flash-attention forward in Triton: executes any ``BlockLayout`` (and its pyramid and permuted-key
variants).

One program per (query head, query block). It walks the query block's key-block list (from the layout), keeps the
online-softmax running max/sum in fp32 and accumulates P·V with tensor-core dots. GQA reads the shared K/V head in
place (no expansion). Because a row's block indices are sorted, the blocks needing no element mask (inside the causal
triangle and both sequence ends) form a prefix, counted per row by ``full_prefix``; the kernel runs that prefix in a
mask-free loop and only the rest (the diagonal, ragged ends) with the element mask. Rows with no key get 0.

One kernel, compile-time switches:
- ``TMA``: Q/K/V tiles come through the tensor-memory accelerator (Hopper; 3-D descriptors over [B·heads, N, D],
  zero-filled past N) instead of pointer loads.
- ``HAS_KPOS``: keys carry their original positions (``key_pos`` int32 [B, Hkv, Nk]); the causal element mask
  compares those instead of indices. This executes permuted keys (``pbs``) exactly.
- ``PYRAMID``: after the exact blocks, blocks listed at pooling levels 2, 4, 8 are attended through mean-pooled K/V
  (each pooled key stands for ``p`` keys, so its logit gets + ln p); ``p`` listed blocks share one 128-wide tile."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..layout import pool_levels
from . import fit, pool

LOG2E = 1.4426950408889634


def _configs():
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _update(acc, l_i, m_i, qk, v, MASKED: tl.constexpr):
    """One online-softmax step on a tile of log2-domain logits ``qk`` and its values ``v``."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:  # a fully masked row keeps m = -inf; subtract 0 instead so nothing becomes NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in the MMA
    return acc, l_i, m_new


@triton.jit
def _attend(acc, l_i, m_i, q, K, V, kv_bh, k_base, v_base, kpos_base, idx_base, j0, j1, s_ik, s_kn, s_kd, s_vn, s_vd,
            offs_m, offs_d, lk, off, qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPOS: tl.constexpr,
            TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Entries j0..j1 of the row's block list, exact keys, with (MASK) or without the element mask. The softmax
    scale (times log2 e) multiplies the fp32 scores: folded into a bf16/fp16 Q it rounded every score by up to 2^-9
    of its size, 1e-2 in log-sum-exp once scores reach ~30."""
    for j in range(j0, j1):
        n = tl.load(idx_base + j * s_ik)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        if TMA:
            k = K.load([kv_bh, n * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = V.load([kv_bh, n * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:  # the block's first key addressed in int64 (see _block_sparse_fwd), the offsets within it int32
            r = tl.arange(0, BLOCK_N)[:, None]
            kb = k_base + (n * BLOCK_N).to(tl.int64) * s_kn + r * s_kn + offs_d[None, :] * s_kd
            vb = v_base + (n * BLOCK_N).to(tl.int64) * s_vn + r * s_vn + offs_d[None, :] * s_vd
            if MASK:
                k = tl.load(kb, mask=offs_n[:, None] < lk, other=0.0)
                v = tl.load(vb, mask=offs_n[:, None] < lk, other=0.0)
            else:
                k = tl.load(kb)
                v = tl.load(vb)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            valid = offs_n[None, :] < lk
            if CAUSAL:
                if HAS_KPOS:
                    kp = tl.load(kpos_base + offs_n, mask=offs_n < lk, other=0)
                    valid = valid & (kp[None, :] <= offs_m[:, None] + off)
                else:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
            qk = tl.where(valid, qk, float("-inf"))
        acc, l_i, m_i = _update(acc, l_i, m_i, qk, v, MASK)
    return acc, l_i, m_i


@triton.jit
def _attend_pooled(acc, l_i, m_i, q, kp_base, vp_base, idx_base, cnt, s_ik, s_kn, s_kd, s_vn, s_vd, offs_d, qk_scale,
                   P: tl.constexpr, LOG2P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Blocks listed at pooling level P: block n's keys are pooled rows n·(BLOCK_N/P) .. (n+1)·(BLOCK_N/P) of the
    level's K/V; P listed blocks fill one BLOCK_N-wide tile (a partly filled last tile is masked)."""
    SUB: tl.constexpr = BLOCK_N // P
    cols = tl.arange(0, BLOCK_N)
    for t in range(0, cnt, P):
        jj = t + cols // SUB
        ok = jj < cnt
        n = tl.load(idx_base + jj * s_ik, mask=ok, other=0)
        rows = n * SUB + cols % SUB
        k = tl.load(kp_base + rows[:, None] * s_kn + offs_d[None, :] * s_kd, mask=ok[:, None], other=0.0)
        v = tl.load(vp_base + rows[:, None] * s_vn + offs_d[None, :] * s_vd, mask=ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale + LOG2P  # log2-domain logits; + log2(P): ln(P) in natural log
        qk = tl.where(ok[None, :], qk, float("-inf"))
        acc, l_i, m_i = _update(acc, l_i, m_i, qk, v, False)  # the first column of a tile is always valid
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, IDX, CNT, NFULL, LQ, LK, KPOS, KP, VP, PIDX, PCNT,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_lb, s_lh,
    s_ib, s_ih, s_im, s_ik,
    s_cb, s_ch, s_cm,
    s_fb, s_fh, s_fm,
    s_pb, s_ph, kpos_off,
    s_kpb, s_kph, s_kpn, s_kpd,
    s_vpb, s_vph, s_vpn, s_vpd,
    s_pil, s_pib, s_pih, s_pim, s_pik,
    s_pcl, s_pcb, s_pch, s_pcm,
    off2, off4, off8,
    H, HK, GROUP, NQB, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    TMA: tl.constexpr, HAS_KPOS: tl.constexpr, PYRAMID: tl.constexpr, RETURN_LSE: tl.constexpr,
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
    kv_bh = b * HK + hk
    # a tile's first row and a block's first key addressed in int64: Triton passes strides below 2^31 as int32, and
    # 28 heads of 600K tokens (or a [B, N, H, D] view's rows past 600K) pass 2^31 elements; the offsets within a
    # tile, the TMA coordinates and the masks stay int32
    b64, h64, hk64, m64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64), (pid_m * BLOCK_M).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)[:, None]
    if TMA:
        q = Q.load([b * H + h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
        k_base = K
        v_base = V
    else:
        q = tl.load(Q + (b64 * s_qb + h64 * s_qh + m64 * s_qm) + rm * s_qm + offs_d[None, :] * s_qd,
                    mask=offs_m[:, None] < lq, other=0.0)
        k_base = K + b64 * s_kb + hk64 * s_kh
        v_base = V + b64 * s_vb + hk64 * s_vh
    cnt = tl.load(CNT + b * s_cb + h * s_ch + pid_m * s_cm)
    nfull = tl.load(NFULL + b * s_fb + h * s_fh + pid_m * s_fm)
    idx_base = IDX + b * s_ib + h * s_ih + pid_m * s_im
    kpos_base = KPOS + b * s_pb + hk * s_ph
    if HAS_KPOS:
        off = kpos_off  # query i sits at key position i + kpos_off
    else:
        off = lk - lq  # bottom-right causal alignment
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Sorted indices make the blocks that need no element mask a prefix: run it without masks, then the rest.
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, K, V, kv_bh, k_base, v_base, kpos_base, idx_base, 0, nfull, s_ik,
                            s_kn, s_kd, s_vn, s_vd, offs_m, offs_d, lk, off, qk_scale, False, CAUSAL, HAS_KPOS, TMA,
                            BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, K, V, kv_bh, k_base, v_base, kpos_base, idx_base, nfull, cnt, s_ik,
                            s_kn, s_kd, s_vn, s_vd, offs_m, offs_d, lk, off, qk_scale, True, CAUSAL, HAS_KPOS, TMA,
                            BLOCK_N, HEAD_DIM)
    if PYRAMID:
        kp_base = KP + b64 * s_kpb + hk64 * s_kph
        vp_base = VP + b64 * s_vpb + hk64 * s_vph
        pidx = PIDX + b * s_pib + h * s_pih + pid_m * s_pim
        pcnt = PCNT + b * s_pcb + h * s_pch + pid_m * s_pcm
        acc, l_i, m_i = _attend_pooled(acc, l_i, m_i, q, kp_base + off2 * s_kpn, vp_base + off2 * s_vpn, pidx,
                                       tl.load(pcnt), s_pik, s_kpn, s_kpd, s_vpn, s_vpd, offs_d, qk_scale, 2, 1.0,
                                       BLOCK_N)
        acc, l_i, m_i = _attend_pooled(acc, l_i, m_i, q, kp_base + off4 * s_kpn, vp_base + off4 * s_vpn,
                                       pidx + s_pil, tl.load(pcnt + s_pcl), s_pik, s_kpn, s_kpd, s_vpn, s_vpd,
                                       offs_d, qk_scale, 4, 2.0, BLOCK_N)
        acc, l_i, m_i = _attend_pooled(acc, l_i, m_i, q, kp_base + off8 * s_kpn, vp_base + off8 * s_vpn,
                                       pidx + 2 * s_pil, tl.load(pcnt + 2 * s_pcl), s_pik, s_kpn, s_kpd, s_vpn,
                                       s_vpd, offs_d, qk_scale, 8, 3.0, BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + (b64 * s_ob + h64 * s_oh + m64 * s_om) + rm * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < lq)
    if RETURN_LSE:  # natural-log sum of exp(scale * q.k) over the row's keys; -inf for a row with none
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + b * s_lb + h * s_lh + offs_m, lse, mask=offs_m < lq)


def clamped_lengths(seqlens, b: int, n: int, device):
    """Per-sequence lengths as int32 [B] clamped into [0, N] on the device (N each where ``seqlens`` is None). Both
    kernels mask keys, and the Gluon one picks its TMA store, by the lengths alone: past N lie the next head's rows of
    the Gluon kernel's flattened K/V and output, or the zero padding of the Triton kernel's TMA loads."""
    if seqlens is None:
        return torch.full((b,), n, dtype=torch.int32, device=device)
    return seqlens.clamp(0, n).to(torch.int32)


def full_prefix(kv_index, kv_count, block_q: int, block_k: int, causal: bool, lq, lk, key_pos=None, group: int = 1,
                kpos_off: int = 0):
    """int32 [B, H, NQ]: how many leading (sorted) blocks of each row need no element mask for each sequence's
    lengths. With ``key_pos`` (int [B, Hkv, Nk], keys' original positions) a block is mask-free when every key in it
    lies at or before the row's first query (query i at key position i + ``kpos_off``); the count is the leading
    run of such blocks. Pure tensor ops, no host sync."""
    nqb = kv_index.shape[2]
    m = torch.arange(nqb, device=kv_index.device)
    valid = torch.arange(kv_index.shape[-1], device=kv_index.device) < kv_count[..., None]
    lk_ = lk.view(-1, 1, 1, 1).long()
    inside = kv_index.long() <= (lk_ // block_k) - 1  # key blocks entirely inside the sequence
    if causal and key_pos is not None:
        b, hk, nk = key_pos.shape
        nkb = -(-nk // block_k)
        kp = torch.nn.functional.pad(key_pos.long(), (0, nkb * block_k - nk), value=nk)
        latest = kp.view(b, hk, nkb, block_k).amax(-1).repeat_interleave(group, 1)  # [B, H, NKB]
        idx = kv_index.long().clamp(max=nkb - 1).expand(b, latest.shape[1], -1, -1)
        first_q = m.view(1, 1, -1, 1) * block_q + kpos_off
        ok = inside & (torch.gather(latest, 2, idx.flatten(2)).view(idx.shape) <= first_q) & valid
        return torch.cumprod(ok.int(), -1).sum(-1, dtype=torch.int32)
    if causal:
        off = (lk - lq).view(-1, 1, 1, 1).long()
        diag = (m.view(1, 1, -1, 1) * block_q + off + 1) // block_k - 1  # blocks entirely at or below row m*bq
        inside = inside & (kv_index.long() <= diag)
    return (inside & valid).sum(-1, dtype=torch.int32)


_TUNED: dict = {}


def _autotuned():
    """The kernel autotuned over warps/stages (CUDA, block shapes without a measured default)."""
    if "k" not in _TUNED:
        _TUNED["k"] = triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "TMA",
                                                               "HAS_KPOS", "PYRAMID", "RETURN_LSE"])(_block_sparse_fwd)
    return _TUNED["k"]


def _hopper_fits(q, k, v, block_q, block_k, scale) -> bool:
    """The Gluon kernel's domain: a Hopper GPU and Triton 3.6 or newer (``VIDSPARSE_ATTENTION_HOPPER=0`` turns it
    off). With an older Triton, Hopper runs this file's kernel."""
    if os.environ.get("VIDSPARSE_ATTENTION_HOPPER", "1") == "0":
        return False
    if not q.is_cuda or fit.capability(q.device)[0] != 9:
        return False
    try:
        from .block_sparse_hopper import supported, triton_supported
    except ImportError:  # Triton before Gluon's Hopper API (3.4 and older)
        return False
    return triton_supported() and supported(q, k, v, block_q, block_k, scale)


def _bcast_strides(t, dims):
    return [t.stride(i) if t.shape[i] > 1 else 0 for i in range(dims)]


def pool_kv(x, full_blocks: int, block_k: int):
    """``layout.pool_levels`` of x [B, Hkv, N, D] stacked along the sequence: -> (pooled [B, Hkv, R, D], row offset
    of each level)."""
    if not full_blocks:  # no complete block: nothing can be pooled (a pyramid layout then lists no pooled block)
        return x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3]), [0, 0, 0]
    if (full_blocks * block_k) % (8 * pool.R) == 0:  # one pass over the keys (kernels/pool.py)
        return pool.pool_levels_stacked(x, full_blocks * block_k)
    return pool_kv_torch(x, full_blocks, block_k)


def pooled_args(k, v, pooled, block_k: int):
    """What both kernels' launches take for the pyramid levels ``pooled`` = (index, count): -> (index, count, pooled
    k, pooled v, each level's first row in them, the index's strides (level first), the count's strides)."""
    pidx, pcnt = pooled
    full_blocks = k.shape[2] // block_k
    kp, offs = pool_kv(k, full_blocks, block_k)
    vp, _ = pool_kv(v, full_blocks, block_k)
    return (pidx, pcnt, kp, vp, offs, [pidx.stride(0)] + _bcast_strides(pidx[0], 4),
            [pcnt.stride(0)] + _bcast_strides(pcnt[0], 3))


def pool_kv_torch(x, full_blocks: int, block_k: int):
    """``pool_kv`` in torch ops (``layout.pool_levels``, then a ``torch.cat``), for blocks of fewer keys than one
    program of ``kernels.pool`` reads; the step that kernel replaced (``benchmarks/pyramid_pool.py``)."""
    parts = pool_levels(x, full_blocks, block_k)
    offs = [sum(t.shape[2] for t in parts[:i]) for i in range(len(parts))]
    return torch.cat(parts, 2), offs


def block_sparse_attention(q, k, v, kv_index, kv_count, block_q: int, block_k: int, causal: bool,
                           scale: float | None, seqlens_q=None, seqlens_k=None, *, key_pos=None, query_offset=None,
                           pooled=None, nfull=None, return_lse: bool = False, tma: bool = False,
                           num_warps: int | None = None, num_stages: int | None = None, hopper: bool | None = None):
    """q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; kv_index int32 [B|1, H|1, NQ, K]; kv_count int32 [B|1, H|1, NQ].

    ``key_pos`` int32 [B, Hkv, Nk]: original key positions for the causal mask (permuted or gathered keys); query i
    then sits at position i + ``query_offset`` (default Nk − Nq); ``nfull`` (int32 [B|1, H|1, NQ], with ``key_pos``):
    each row's count of leading mask-free blocks where the caller already knows it (else ``full_prefix`` counts
    them). ``return_lse``: also return the rows' natural-log sum of exp(scale·q·k), float32 [B, H, Nq] (-inf where a
    row saw no key). ``pooled``: the pyramid levels as (index int32 [3, B, H, NQ, W], count int32 [3, B, H, NQ])
    for levels 2, 4, 8; pooled blocks must be entirely visible to their query block (no element mask is applied to
    them). ``tma``: Hopper tensor descriptors (q, k, v contiguous; not with ``pooled``). ``num_warps``/``num_stages``
    fix the launch instead of autotuning (CUDA). ``hopper``: run the warp-specialised Gluon kernel
    (``block_sparse_hopper``); by default it runs wherever it applies (a Hopper GPU, 128×128 blocks, bf16/fp16, head
    dim 64/128, no fixed launch). ``seqlens_q``/``seqlens_k`` int [B]: per-sequence lengths, clamped into [0, N]."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if d not in fit.ATTENTION_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the kernel {fit.ATTENTION_HEAD_DIMS}")
    if tma and pooled is not None:
        raise ValueError("the pyramid levels run on pointer loads: tma=False")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if hopper is None:
        hopper = num_warps is None and _hopper_fits(q, k, v, block_q, block_k, scale)
    if hopper:  # decides the element masks itself and writes every row: none of the set-up below
        from .block_sparse_hopper import block_sparse_attention_hopper

        return block_sparse_attention_hopper(q, k, v, kv_index, kv_count, causal, scale, seqlens_q, seqlens_k,
                                             return_lse, key_pos=key_pos, query_offset=query_offset, pooled=pooled,
                                             nfull=nfull)
    out = torch.zeros_like(q)  # rows past a sequence's length stay 0
    dev = q.device
    lq, lk = clamped_lengths(seqlens_q, b, nq, dev), clamped_lengths(seqlens_k, b, nk, dev)
    kpos_off = (nk - nq) if query_offset is None else int(query_offset)
    if nfull is None or key_pos is None:
        nfull = full_prefix(kv_index, kv_count, block_q, block_k, causal, lq, lk, key_pos, h // hk, kpos_off)
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=dev) if return_lse else lk
    kpos = key_pos.to(torch.int32) if key_pos is not None else lk  # a dummy pointer when unused
    s_kpos = [kpos.stride(0), kpos.stride(1)] if key_pos is not None else [0, 0]
    if pooled is not None:
        pidx, pcnt, kp, vp, offs, s_pidx, s_pcnt = pooled_args(k, v, pooled, block_k)
    else:
        pidx, pcnt, kp, vp, offs = kv_index, kv_count, k, v, [0, 0, 0]
        s_pidx, s_pcnt = [0] * 5, [0] * 4
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qa = TensorDescriptor(q.view(b * h, nq, d), [b * h, nq, d], [nq * d, d, 1], [1, block_q, d])
        ka = TensorDescriptor(k.view(b * hk, nk, d), [b * hk, nk, d], [nk * d, d, 1], [1, block_k, d])
        va = TensorDescriptor(v.view(b * hk, nk, d), [b * hk, nk, d], [nk * d, d, 1], [1, block_k, d])
    else:
        qa, ka, va = q, k, v
    nqb = triton.cdiv(nq, block_q)
    grid = ((h // hk) * nqb, b * hk)
    args = (
        qa, ka, va, out, lse, kv_index, kv_count, nfull, lq, lk, kpos, kp, vp, pidx, pcnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *((lse.stride(0), lse.stride(1)) if return_lse else (0, 0)),
        *_bcast_strides(kv_index, 4), *_bcast_strides(kv_count, 3), *_bcast_strides(nfull, 3), *s_kpos, kpos_off,
        *kp.stride(), *vp.stride(), *s_pidx, *s_pcnt, *offs,
        h, hk, h // hk, nqb, scale * LOG2E,
    )
    consts = {"HEAD_DIM": d, "BLOCK_M": block_q, "BLOCK_N": block_k, "CAUSAL": causal, "TMA": tma,
              "HAS_KPOS": key_pos is not None, "PYRAMID": pooled is not None, "RETURN_LSE": return_lse}
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no autotuner and no launch resources
        _block_sparse_fwd[grid](*args, **consts)
    elif num_warps is not None:
        _block_sparse_fwd[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages or 3)
    elif block_q == block_k == 128:
        # measured on an H100 (benchmarks/tune_attention.py): 8 warps, 3 stages (2 for the pyramid's extra loops);
        # 4 stages exceed shared memory; the autotuner's pick between near-equal configs was noisy (up to 13% worse).
        # Fewer stages where the GPU's shared memory is smaller (fit.py: 160 KB at head dim 128 and 3 stages, 96 KB
        # at 2 stages, built for sm_86)
        stages = (num_stages, ) if num_stages else (2, 1) if pooled is not None else (3, 2, 1)
        shape = (d, q.dtype, tma, key_pos is not None, pooled is not None, return_lse, num_stages)
        fit.launch_fitting("block_sparse_attention", q.device, shape, stages,
                           lambda st: _block_sparse_fwd[grid](*args, **consts, num_warps=8, num_stages=st),
                           instead="backend 'torch'")
    else:
        _autotuned()[grid](*args, **consts)  # the autotuner passes over launches that do not fit
    return (out, lse) if return_lse else out
