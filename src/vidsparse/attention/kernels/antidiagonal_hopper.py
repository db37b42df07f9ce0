"""XAttention's block mass on Hopper in Gluon, warp-specialised: the computation of ``antidiagonal.py``'s Triton
kernel (strided scores, their row softmax, its sums per (query block, key block), never the score matrix) with the
producer/consumer structure of ``block_sparse_hopper.py``.

In the Triton kernel both warpgroups of a program issue their products and then both run the softmax epilogue of a
column tile, so the tensor cores idle during every epilogue (about a quarter of the work at 128 × 128 tiles). Here:

- One loader warp streams, per (column tile, stride phase), the phase's two [64, D] query boxes and its [BN, D] key
  box through TMA into a ring of ``STAGES`` shared-memory stages (``ready``/``empty`` mbarriers). The descriptors are
  2-D views [B·heads·N/S, S·D]: phase j of strided row i is columns j·D..(j+1)·D of row i, as in the Triton kernel.
- Two consumer warpgroups, each owning 64 of a row tile's 128 strided rows, chain the S products of a column tile
  into one accumulator (each issued while the previous one runs) and then run that tile's epilogue: mask (edge tiles
  only), online softmax, the log2 partial mass of each key block into the scratch. They are independent partitions,
  so one's epilogue overlaps the other's products.
- Persistent programs walk the work items (head, row tile, column split) in the Triton kernel's order, longest causal
  rows first, with a static stride; loader and consumers walk the same sequence, so no tile ids are handed over.
- As in the Triton kernel a row tile's column tiles are split over ``SPLITS`` items; each consumer writes its rows'
  max and sum, and the last of a row half's splits to finish (an atomic count) merges them and writes that half's
  block masses (its 64 rows are whole query blocks).

A box reaching past a head's last strided row reads the next head's rows (the 2-D view has no per-head bound): the
epilogue gives rows past N/S score 0, as the zero padding of the torch path does. Lengths must be stride multiples
(``antidiagonal.tma_fits``)."""

from __future__ import annotations

import functools

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

ROWS, COLS = 128, 128  # strided rows per row tile (64 per consumer), strided columns per column tile
BM = gl.constexpr(ROWS)
BN = gl.constexpr(COLS)
STAGES = gl.constexpr(3)  # 3 × (2 query boxes + 1 key box) = 192 KB of shared memory at D = 128
CONSUMER_REGS = 240
LOADER_REGS = 24
MAXNREG = 168


@gluon.jit
def _item(w, NH, NRT, NKB, col_lim, off_s, SPLITS: gl.constexpr, KC: gl.constexpr, CAUSAL: gl.constexpr):
    """Work item ``w`` -> (head within the group, row tile, the row tile's column end, first and end column tile):
    heads fastest, then the splits of a row tile, row tiles from the last (longest causal row) down."""
    i = w % NH
    r = w // NH
    split = r % SPLITS
    pid_m = NRT - 1 - r // SPLITS
    hi = gl.minimum(NKB * KC, col_lim)
    if CAUSAL:
        hi = gl.minimum(hi, pid_m * BM + BM + off_s)  # no column past the tile's last diagonal
    ntl = gl.cdiv(hi, BN)
    per = gl.cdiv(ntl, SPLITS)
    t0 = split * per
    t1 = gl.maximum(gl.minimum(ntl, t0 + per), t0)
    return i, pid_m, hi, t0, t1


@gluon.jit
def _loader(args, S: gl.constexpr, D: gl.constexpr, KC: gl.constexpr, QR: gl.constexpr, KBT: gl.constexpr,
            SPLITS: gl.constexpr, CAUSAL: gl.constexpr):
    (q_desc, k_desc, q_bufs, k_bufs, ready, empty, _LP, _ML, _CNT, _OUT, _s_pb, _s_pm, _s_ob, _s_oh, _s_om, _s_on,
     bh0, H, GROUP, NQS, NKS, NH, NRT, NW, _R, RP, NKB, col_lim, off_s, _qk_scale) = args
    c = 0
    for w in range(gl.program_id(0), NW, gl.num_programs(0)):
        i, pid_m, _hi, t0, t1 = _item(w, NH, NRT, NKB, col_lim, off_s, SPLITS, KC, CAUSAL)
        bh = bh0 + i
        q_row = bh * NQS + pid_m * BM
        k_row = ((bh // H) * (H // GROUP) + (bh % H) // GROUP) * NKS
        for t in range(t0 * S, t1 * S):
            j = t % S
            slot = c % STAGES
            mbarrier.wait(empty.index(slot), ((c // STAGES) & 1) ^ 1)  # fresh barriers count as a completed phase 1
            mbarrier.expect(ready.index(slot), 2 * q_desc.block_type.nbytes + k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row, (S - 1 - j) * D], ready.index(slot),
                                            q_bufs.index(2 * slot))
            tma.async_copy_global_to_shared(q_desc, [q_row + BM // 2, (S - 1 - j) * D], ready.index(slot),
                                            q_bufs.index(2 * slot + 1))
            tma.async_copy_global_to_shared(k_desc, [k_row + (t // S) * BN, j * D], ready.index(slot),
                                            k_bufs.index(slot))
            c += 1


@gluon.jit
def _consumer(args, WG: gl.constexpr, S: gl.constexpr, D: gl.constexpr, KC: gl.constexpr, QR: gl.constexpr,
              KBT: gl.constexpr, SPLITS: gl.constexpr, CAUSAL: gl.constexpr):
    (_q_desc, _k_desc, q_bufs, k_bufs, ready, empty, LP, ML, CNT, OUT, s_pb, s_pm, s_ob, s_oh, s_om, s_on,
     bh0, H, GROUP, NQS, NKS, NH, NRT, NW, R, RP, NKB, col_lim, off_s, qk_scale) = args
    HM: gl.constexpr = BM // 2
    NB: gl.constexpr = BN // KC  # key blocks per column tile
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    P_L: gl.constexpr = gl.BlockedLayout([1, 1], [32 // NB, NB], [4, 1], [1, 0])  # the key blocks' partials
    R_L: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])  # a row vector
    # the block sums: [query blocks of this half, their rows, key blocks]
    M_L: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32 // (KBT // 4), KBT // 4], [4, 1, 1], [2, 1, 0])
    s_zero = gl.zeros([HM, BN], gl.float32, S_L)
    offs_n = gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))
    offs_b = gl.arange(0, NB, layout=gl.SliceLayout(0, P_L))
    c = 0
    for w in range(gl.program_id(0), NW, gl.num_programs(0)):
        i, pid_m, hi, t0, t1 = _item(w, NH, NRT, NKB, col_lim, off_s, SPLITS, KC, CAUSAL)
        row0 = pid_m * BM + WG * HM
        rows = row0 + gl.arange(0, HM, layout=gl.SliceLayout(1, S_L))
        rows_p = row0 + gl.arange(0, HM, layout=gl.SliceLayout(1, P_L))
        lp_rows = LP + i * s_pb + rows_p[:, None] * s_pm
        m = gl.full([HM], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
        l = gl.zeros([HM], gl.float32, gl.SliceLayout(1, S_L))
        for tile in range(t0, t1):
            # the tile's S products chained into one accumulator, each issued while the previous one runs
            slot = c % STAGES
            mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
            acc = warpgroup_mma(q_bufs.index(2 * slot + WG), k_bufs.index(slot).permute((1, 0)), s_zero,
                                use_acc=False, is_async=True)
            c += 1
            for _j in gl.static_range(S - 1):
                slot = c % STAGES
                mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
                acc = warpgroup_mma(q_bufs.index(2 * slot + WG), k_bufs.index(slot).permute((1, 0)), acc,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)
                c += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)
            c0 = tile * BN
            sc = acc * qk_scale
            # only tiles that reach past the key end, this half's first diagonal or the last strided row are masked
            edge = (c0 + BN > hi) | (row0 + HM > NQS)
            if CAUSAL:
                edge = edge | (c0 + BN - 1 > row0 + off_s)
            if edge:
                cols = c0 + offs_n
                valid = cols[None, :] < hi
                if CAUSAL:
                    valid = valid & (cols[None, :] <= rows[:, None] + off_s)
                sc = gl.where(rows[:, None] >= NQS, 0.0, sc)  # past N/S: the torch path's zero padding
                sc = gl.where(valid, sc, float("-inf"))
            m_new = gl.maximum(m, gl.max(sc, 1))
            m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
            p = gl.exp2(sc - m_sub[:, None])
            l = l * gl.exp2(m - m_sub) + gl.sum(p, 1)
            m = m_new
            part = gl.convert_layout(gl.sum(gl.reshape(p, [HM, NB, KC]), 2), P_L)
            lpart = gl.where(part > 0, gl.convert_layout(m_sub, gl.SliceLayout(1, P_L))[:, None] + gl.log2(part),
                             float("-inf"))
            kb = c0 // KC + offs_b
            gl.store(lp_rows + kb[None, :], lpart, mask=(rows_p[:, None] < R) & (kb[None, :] < NKB))
        # this split's row max and sum, then the arrival; the last of the half's splits writes its block masses
        ml_rows = ML + (i * SPLITS + w // NH % SPLITS) * 2 * RP + row0 + gl.arange(0, HM, layout=R_L)
        gl.store(ml_rows, gl.convert_layout(m, R_L))
        gl.store(ml_rows + RP, gl.convert_layout(l, R_L))
        gl.thread_barrier()  # every thread's partials are written before the arrival below publishes them
        if gl.atomic_add(CNT + (i * NRT + pid_m) * 2 + WG, 1, sem="acq_rel") == SPLITS - 1:
            QB: gl.constexpr = HM // QR
            qb_i = gl.arange(0, QB, layout=gl.SliceLayout(1, gl.SliceLayout(2, M_L)))
            r_i = gl.arange(0, QR, layout=gl.SliceLayout(0, gl.SliceLayout(2, M_L)))
            row3 = gl.expand_dims(row0 + qb_i[:, None] * QR + r_i[None, :], 2)  # [QB, QR, 1]
            mx = gl.full([QB, QR, 1], float("-inf"), gl.float32, M_L)
            for sp in gl.static_range(SPLITS):
                mx = gl.maximum(mx, gl.load(ML + (i * SPLITS + sp) * 2 * RP + row3, cache_modifier=".cg"))
            mx_sub = gl.where(mx == float("-inf"), 0.0, mx)
            lt = gl.zeros([QB, QR, 1], gl.float32, M_L)
            for sp in gl.static_range(SPLITS):
                other = ML + (i * SPLITS + sp) * 2 * RP + row3
                lt += gl.load(other + RP, cache_modifier=".cg") * gl.exp2(gl.load(other, cache_modifier=".cg") -
                                                                          mx_sub)
            lse = gl.where(lt > 0, mx + gl.log2(lt), 0.0)  # a row that saw nothing has only -inf partials
            kb_hi = (hi + KC - 1) // KC
            kb_i = gl.arange(0, KBT, layout=gl.SliceLayout(0, gl.SliceLayout(1, M_L)))
            kb3 = gl.expand_dims(gl.expand_dims(kb_i, 0), 1)  # [1, 1, KBT]
            qb_o = gl.arange(0, QB, layout=gl.SliceLayout(1, gl.SliceLayout(1, M_L)))
            b = (bh0 + i) // H
            h = (bh0 + i) % H
            out_rows = OUT + b * s_ob + h * s_oh + (row0 // QR + qb_o[:, None]) * s_om
            for kb0 in range(0, NKB, KBT):
                lp = gl.load(LP + i * s_pb + row3 * s_pm + kb0 + kb3, mask=(row3 < R) & (kb0 + kb3 < kb_hi),
                             other=float("-inf"), cache_modifier=".cg")
                mass = gl.sum(gl.exp2(lp - lse), 1)
                kb_o = kb0 + kb_i[None, :]
                gl.store(out_rows + kb_o * s_on, mass, mask=((row0 // QR + qb_o[:, None]) * QR < R) & (kb_o < NKB))


@gluon.jit
def _consumer0(args, S: gl.constexpr, D: gl.constexpr, KC: gl.constexpr, QR: gl.constexpr, KBT: gl.constexpr,
               SPLITS: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(args, 0, S, D, KC, QR, KBT, SPLITS, CAUSAL)


@gluon.jit
def _consumer1(args, S: gl.constexpr, D: gl.constexpr, KC: gl.constexpr, QR: gl.constexpr, KBT: gl.constexpr,
               SPLITS: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(args, 1, S, D, KC, QR, KBT, SPLITS, CAUSAL)


@gluon.jit
def _mass(q_desc, k_desc, LP, ML, CNT, OUT, s_pb, s_pm, s_ob, s_oh, s_om, s_on, bh0, H, GROUP, NQS, NKS, NH, NRT,
          NW, R, RP, NKB, col_lim, off_s, qk_scale, S: gl.constexpr, D: gl.constexpr, KC: gl.constexpr,
          QR: gl.constexpr, KBT: gl.constexpr, SPLITS: gl.constexpr, CAUSAL: gl.constexpr,
          CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2 * STAGES, BM // 2, D], q_desc.layout)  # [stage × half]
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release a stage
    fence_async_shared()
    args = (q_desc, k_desc, q_bufs, k_bufs, ready, empty, LP, ML, CNT, OUT, s_pb, s_pm, s_ob, s_oh, s_om, s_on,
            bh0, H, GROUP, NQS, NKS, NH, NRT, NW, R, RP, NKB, col_lim, off_s, qk_scale)
    gl.warp_specialize([(_consumer0, (args, S, D, KC, QR, KBT, SPLITS, CAUSAL)),
                        (_consumer1, (args, S, D, KC, QR, KBT, SPLITS, CAUSAL)),
                        (_loader, (args, S, D, KC, QR, KBT, SPLITS, CAUSAL))], [4, 1],
                       [CONSUMER_REGS, LOADER_REGS])


def supported(q, k, stride: int, block_q: int, block_k: int) -> bool:
    """Whether this kernel computes the call: 16-bit inputs on Hopper or later with stride-multiple lengths
    (``antidiagonal.tma_fits``), head dim 64 or 128, and key/query blocks whose strided rows split evenly into
    the kernel's tiles (a query block within one consumer's 64 rows, a key block within a 128-column tile)."""
    from .antidiagonal import tma_fits

    return (tma_fits(q, k, stride) and q.shape[-1] in (64, 128) and block_q % stride == 0 and block_k % stride == 0
            and (ROWS // 2) % (block_q // stride) == 0 and COLS % (block_k // stride) == 0 and block_k // stride >= 2)



@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def antidiagonal_block_mass_hopper(q, k, stride: int, block_q: int, block_k: int, causal: bool, splits: int = 4):
    """``antidiagonal.antidiagonal_block_mass`` (same arguments, same result) through this kernel; the caller checks
    ``supported``. ``splits``: work items per row tile."""
    from .antidiagonal import LOG2E, SCRATCH_BYTES

    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    s = stride
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    qr, kc = block_q // s, block_k // s
    r = nqb * qr
    nrt = triton.cdiv(r, ROWS)
    rp = nrt * ROWS
    q, k = (x if x.is_contiguous() and x.data_ptr() % 16 == 0 else x.contiguous() for x in (q, k))
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q2, k2 = q.view(b * h * nq // s, s * d), k.view(b * hk * nk // s, s * d)
    qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [ROWS // 2, d],
                          gl.NVMMASharedLayout.get_default_for([ROWS // 2, d], gdt))
    kd = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [COLS, d], gl.NVMMASharedLayout.get_default_for([COLS, d], gdt))
    out = torch.empty(b, h, nqb, nkb, dtype=torch.float32, device=q.device)  # every entry is written
    group = max(1, min(b * h, SCRATCH_BYTES // (rp * nkb * 4)))
    lp = torch.empty(group, rp, nkb, dtype=torch.float32, device=q.device)
    ml = torch.empty(group, splits, 2, rp, dtype=torch.float32, device=q.device)  # each split's row max and sum
    arrived = torch.zeros(-(-b * h // group), group, nrt, 2, dtype=torch.int32, device=q.device)  # per row half
    kbt = max(16, min(64, triton.next_power_of_2(nkb)))
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    for bh0 in range(0, b * h, group):
        n = min(group, b * h - bh0)
        nw = n * nrt * splits
        _mass[(min(nw, sms),)](
            qd, kd, lp, ml, arrived[bh0 // group], out, lp.stride(0), lp.stride(1), *out.stride(), bh0, h, h // hk,
            nq // s, nk // s, n, nrt, nw, r, rp, nkb, -(-nk // s), (nk - nq) // s, LOG2E / (d ** 0.5 * s),
            S=s, D=d, KC=kc, QR=qr, KBT=kbt, SPLITS=splits, CAUSAL=causal, CONSUMER_REGS=CONSUMER_REGS,
            LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
        )
    return out
