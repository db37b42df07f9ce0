"""Block-sparse flash-attention forward for Hopper in Gluon, warp-specialised in the manner of FlashAttention-3.

Executes the plain ``BlockLayout`` path of ``block_sparse.py`` (128×128 blocks, bf16/fp16, head dim 64 or 128,
causal or not, GQA, per-sequence lengths, optional log-sum-exp) with explicit Hopper machinery that a ``@triton.jit``
kernel cannot express in Triton 3.6:

- Three partitions per program: one loader warp that streams the row's K and V blocks through the tensor-memory
  accelerator into two-deep shared-memory rings (``ready``/``empty`` mbarriers), and two consumer warpgroups, each
  owning 64 of the block's 128 query rows. The consumers are independent partitions, so the warp schedulers interleave
  one's softmax with the other's tensor-core work instead of running both in lockstep.
- Inside each consumer, the softmax of key block j overlaps the asynchronous P·V product of block j−1 and the
  Q·Kᵀ product of block j is issued before that P·V (``warpgroup_mma(..., is_async=True)`` with explicit waits): the
  tensor cores are fed while the special-function units compute exponentials.
- The softmax scale (times log2 e) is applied in the exponent's fused multiply-add, not to Q, and P goes to the
  P·V product straight from registers.
- FlashAttention-3's explicit ping-pong (the consumers take turns issuing their products through two mbarriers) is
  available as ``PINGPONG`` (``VIDSPARSE_ATTENTION_PINGPONG=1``) but off: on an H100 it measured 10–15% slower on
  sparse layouts at 128K tokens and equal on dense ones (``benchmarks/tune_attention.py --hopper-only``) — the
  independent partitions already interleave without it.

The Triton kernel in ``block_sparse.py`` stays the reference implementation for every other case (pointer loads,
pyramid levels, key positions, other block shapes, the interpreter)."""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK = 128
NUM_STAGES = 2
CONSUMER_REGS = 240
LOADER_REGS = 24
MAXNREG = 168  # 12 warps (two consumer warpgroups + the loader's warpgroup) × 32 threads × 168 ≤ 65,536 registers


@gluon.jit
def _softmax(s, m_i, l_i, n, masked, offs_m, offs_nb, lk, off, qk_scale, CAUSAL: gl.constexpr):
    """Online-softmax step on raw scores ``s`` of key block ``n`` (element mask when ``masked``); returns P (fp32),
    the factor that rescales the accumulator, and the new running max (scaled log2 domain) and sum."""
    if masked:
        cols = n * s.shape[1] + offs_nb
        valid = cols[None, :] < lk
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + off)
        s = gl.where(valid, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at -inf, never NaN
    p = gl.exp2(s * qk_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _take_turn(turn, t, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong (FlashAttention-3): the two consumer warpgroups take turns issuing their tensor-core work, so one's
    softmax runs while the other's products do. Turn t of warpgroup 0 follows turn t-1 of warpgroup 1 and vice versa
    (a fresh barrier counts as a completed phase 1, so warpgroup 0 starts)."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (t & 1) ^ (1 - WG))


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _consumer(args, WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty, turn, o_base,
     lse_base,
     idx_base, s_ik, s_om, s_od, cnt, nfull, q_row0, kv_row0, m0, lq, lk, off, qk_scale) = args
    BM: gl.constexpr = BLOCK_M // 2
    row0 = m0 + WG * BM  # this warpgroup's first query row
    dtype: gl.constexpr = q_desc.dtype
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    q_s = q_bufs.index(WG)
    q_bar = q_bars.index(WG)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0 + (row0 - m0), 0], q_bar, q_s)

    offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, S_L))
    offs_nb = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
    m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, S_L))
    acc = gl.zeros([BM, HEAD_DIM], gl.float32, O_L)
    s_zero = gl.zeros([BM, BLOCK_N], gl.float32, S_L)
    mbarrier.wait(q_bar, 0)
    if cnt > 0:
        # key block 0: scores, then softmax (nothing to rescale yet)
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, WG, PINGPONG)
        s = warpgroup_mma(q_s, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        n = gl.load(idx_base)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, n, nfull <= 0, offs_m, offs_nb, lk, off, qk_scale, CAUSAL)
        p = gl.convert_layout(p.to(dtype), P_L)
        for j in range(1, cnt):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            # Q·K_jᵀ goes first, then P_{j-1}·V_{j-1}; the softmax of block j overlaps the latter
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            _take_turn(turn, j, WG, PINGPONG)
            s = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)
            _pass_turn(turn, WG, PINGPONG)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            mbarrier.arrive(k_empty.index(slot), count=1)
            n = gl.load(idx_base + j * s_ik)
            p32, alpha, m_i, l_i = _softmax(s, m_i, l_i, n, j >= nfull, offs_m, offs_nb, lk, off, qk_scale,
                                            CAUSAL)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
            p = gl.convert_layout(p32.to(dtype), P_L)
        last = (cnt - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((cnt - 1) // STAGES) & 1)
        _take_turn(turn, cnt, WG, PINGPONG)
        acc = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(last), count=1)

    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, O_L))[:, None]
    rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, O_L))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_L))
    gl.store(o_base + rows[:, None] * s_om + offs_d[None, :] * s_od, out.to(dtype), mask=rows[:, None] < lq)
    if RETURN_LSE:  # natural-log sum of exp(scale · q·k) over the row's keys; -inf for a row that saw none
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        gl.store(lse_base + offs_m, lse, mask=offs_m < lq)


@gluon.jit
def _consumer0(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    _consumer(args, 0, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, PINGPONG)


@gluon.jit
def _consumer1(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    _consumer(args, 1, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, PINGPONG)


@gluon.jit
def _loader(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
    (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty, turn, o_base,
     lse_base,
     idx_base, s_ik, s_om, s_od, cnt, nfull, q_row0, kv_row0, m0, lq, lk, off, qk_scale) = args
    for j in range(cnt):
        slot = j % STAGES
        phase = (j // STAGES) & 1
        row = kv_row0 + gl.load(idx_base + j * s_ik) * BLOCK_N
        mbarrier.wait(k_empty.index(slot), phase ^ 1)  # fresh barriers count as a completed phase 1
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(slot), k_bufs.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(slot), v_bufs.index(slot))


@gluon.jit
def _fwd(q_desc, k_desc, v_desc, O, LSE, IDX, CNT, NFULL, LQ, LK,
         s_ob, s_oh, s_om, s_od, s_lb, s_lh,
         s_ib, s_ih, s_im, s_ik, s_cb, s_ch, s_cm, s_fb, s_fh, s_fm,
         NQ, NK, H, HK, GROUP, NQB, qk_scale,
         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
         RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
         LOADER_REGS: gl.constexpr):
    # Same launch order as the Triton kernel: query heads sharing a K/V head fastest, longest causal rows first.
    pid_g = gl.program_id(0) % GROUP
    pid_m = NQB - 1 - gl.program_id(0) // GROUP
    b = gl.program_id(1) // HK
    hk = gl.program_id(1) % HK
    h = hk * GROUP + pid_g
    lq = gl.load(LQ + b)
    lk = gl.load(LK + b)
    if pid_m * BLOCK_M < lq:
        cnt = gl.load(CNT + b * s_cb + h * s_ch + pid_m * s_cm)
        nfull = gl.load(NFULL + b * s_fb + h * s_fh + pid_m * s_fm)
        BM: gl.constexpr = BLOCK_M // 2
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, BM, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a slot
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        args = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, k_empty, v_ready, v_empty, turn,
                O + b * s_ob + h * s_oh, LSE + b * s_lb + h * s_lh, IDX + b * s_ib + h * s_ih + pid_m * s_im, s_ik,
                s_om, s_od, cnt, nfull, (b * H + h) * NQ + pid_m * BLOCK_M, (b * HK + hk) * NK, pid_m * BLOCK_M,
                lq, lk, lk - lq, qk_scale)
        gl.warp_specialize([(_consumer0, (args, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, PINGPONG)),
                            (_consumer1, (args, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, PINGPONG)),
                            (_loader, (args, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, PINGPONG))], [4, 1],
                           [CONSUMER_REGS, LOADER_REGS])


def _tma_ready(t2):
    """A 2-D [rows, D] view the tensor-memory accelerator can read: contiguous and 16-byte aligned, else a copy."""
    return t2 if t2.is_contiguous() and t2.data_ptr() % 16 == 0 else t2.clone(memory_format=torch.contiguous_format)


def supported(q, k, v, block_q: int, block_k: int, scale: float) -> bool:
    """Whether the kernel can run this call on a Hopper GPU (``block_sparse._hopper_fits`` checks the device):
    128×128 blocks, bf16/fp16, head dim 64 or 128, a positive scale. (Non-contiguous inputs — a model's q/k/v are
    usually transposed views — are copied.)"""
    return (block_q == block_k == BLOCK and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == v.dtype == q.dtype and q.shape[-1] in (64, 128) and scale > 0)


def block_sparse_attention_hopper(q, k, v, kv_index, kv_count, nfull, lq, lk, causal: bool, scale: float,
                                  return_lse: bool = False, stages: int = NUM_STAGES,
                                  consumer_regs: int = CONSUMER_REGS, pingpong: bool | None = None):
    """The launch for ``block_sparse.block_sparse_attention`` (which computes ``nfull`` and the lengths): q [B, H,
    Nq, D], k/v [B, Hkv, Nk, D] (copied when not contiguous or not 16-byte aligned, as TMA needs);
    kv_index/kv_count/nfull broadcastable over B and H. ``pingpong``: default ``VIDSPARSE_ATTENTION_PINGPONG=1``."""
    from .block_sparse import LOG2E, _bcast_strides

    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK // 2, d], gdt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK, d], gdt)
    q2, k2, v2 = (_tma_ready(t.reshape(-1, d)) for t in (q, k, v))
    qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BLOCK // 2, d], q_layout)
    kd = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BLOCK, d], kv_layout)
    vd = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BLOCK, d], kv_layout)
    out = torch.zeros_like(q)
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else lk
    nqb = triton.cdiv(nq, BLOCK)
    grid = ((h // hk) * nqb, b * hk)
    _fwd[grid](
        qd, kd, vd, out, lse, kv_index, kv_count, nfull, lq, lk,
        *out.stride(), *((lse.stride(0), lse.stride(1)) if return_lse else (0, 0)),
        *_bcast_strides(kv_index, 4), *_bcast_strides(kv_count, 3), *_bcast_strides(nfull, 3),
        nq, nk, h, hk, h // hk, nqb, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=BLOCK, BLOCK_N=BLOCK, CAUSAL=causal, RETURN_LSE=return_lse, STAGES=stages,
        PINGPONG=os.environ.get("VIDSPARSE_ATTENTION_PINGPONG", "0") == "1" if pingpong is None else pingpong,
        CONSUMER_REGS=consumer_regs, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )
    return (out, lse) if return_lse else out
