"""Block-sparse flash-attention forward for Hopper in Gluon, persistent and warp-specialised in the manner of
FlashAttention-3.

Executes the layouts of ``block_sparse.py`` (128×128 blocks, bf16/fp16, head dim 64 or 128, causal or not, GQA,
per-sequence lengths, keys with their original positions — ``pbs``'s permuted keys, a model's kept-key subsets —
``pyramid``'s pooled levels, optional log-sum-exp) with explicit Hopper machinery that a ``@triton.jit`` kernel
cannot express in Triton 3.6:

- Persistent programs with a dynamic schedule: one program per SM; each takes its first tile by its id and then
  claims the next unclaimed (batch, head, query block) tile from a global counter, in launch order (query heads
  sharing a K/V head fastest, each head's longest causal rows first). Programs thus stay on neighbouring tiles, as
  the hardware's own block scheduling keeps them, so K/V blocks are shared in L2; a static stride lets them drift
  apart. The loader claims the next tile while the current one loads and
  hands its id to the consumers through shared memory; it fetches that tile's Q and first K/V blocks while the
  consumers finish the current one, and a tile's last P·V product runs beside the next tile's first Q·Kᵀ — so a
  tile's setup, Q load, last product and store leave the critical path. At low density a row has only a few key
  blocks, and that fixed cost was a large share of it.
- Three partitions per program: one loader warp that streams Q and the rows' K and V blocks through the tensor-memory
  accelerator into shared memory (Q two buffers per consumer with ``q_ready``/``q_empty`` mbarriers, K and V two-deep
  rings with ``ready``/``empty`` ones), and two consumer warpgroups, each owning 64 of a tile's 128 query rows. The
  consumers are independent partitions, so the warp schedulers interleave one's softmax with the other's tensor-core
  work.
- Inside each consumer, the softmax of key block j overlaps the asynchronous P·V product of block j−1 and the
  Q·Kᵀ product of block j is issued before that P·V (``warpgroup_mma(..., is_async=True)`` with explicit waits).
- Which blocks need the element mask (the sequence end, the causal diagonal) is decided per block and per consumer
  from the block's last key and the consumer's first row, so the launch needs no precomputed mask-free counts. Rows
  past a sequence's length and tiles past it are written as zeros (log-sum-exp −inf) by the kernel: no memset.
  With key positions a block's keys are not in order, so the launch does pass each row's count of leading mask-free
  blocks (``full_prefix``), and only the blocks after them read their keys' positions for the causal mask.
- Pyramid levels follow a row's exact blocks as further steps of the same pipeline: p blocks listed at level p share
  one 128-key tile, which the loader fills from the mean-pooled K/V in 16-row TMA boxes (128/p pooled rows a
  block) into the same ring; the consumers add the level's ln p to the logits through the row max and mask only a
  part-filled last tile.
- The softmax scale (times log2 e) is applied in the exponent's fused multiply-add, not to Q, and P goes to the
  P·V product straight from registers.
- The epilogue stages a tile's output in that tile's own Q buffer (free once its last Q·Kᵀ is done; handed back to
  the loader afterwards). Stored straight from the MMA layout it was 2-byte stores whose backlog in the store unit
  stalled the next tile's softmax (Nsight Compute, ``benchmarks/ncu_target.py``); staging, then 16-byte stores from
  the buffer, made 16K tokens at 5% density 1.30× faster (BENCHMARKS.md, "A/B against"). Where the output is
  [B, H, Nq, D] in order, a tile whose rows all lie inside the sequence now leaves the buffer through one TMA store
  instead (the others, and other output layouts, keep the 16-byte stores): 3–5% less GPU time at 16K tokens and
  5% density, 1–2% at 32K and 10%, level at 64K–128K and on dense layouts (H200,
  ``tune_attention.py --against``, the section "A/B against .ab/hopper_args_none.py").
- Lazy rescale (FlashAttention-4's rule) on layouts whose rows reach ``LAZY_MIN_BLOCKS`` blocks: a row's running
  max moves only once a block passes it by 2^8 and the accumulator is rescaled only on blocks where some row of the
  warpgroup moved (``_softmax_lazy``; one cross-warp reduction a block for the flag). Forced on against off on an
  H200 (``tune_attention.py --lazy``): 0.977–1.001× as launched on rows of 52 and 103 blocks, 0.986–1.037× at 26,
  level at 7; against the kernel before it (``--against``): 0.967–0.990× at 128K and 10%, 0.94–0.97× at 128K
  dense. Rows of a few blocks keep the eager rescale, where the H100 measured the lazy one 1–3% slower; the width
  sweep (``--lazy --widths``) found ``block_topk``'s layouts up to 3% slower lazily at widths 10–13, level at 20 and
  0–1.4% faster on GPU time from 24 (random layouts are level or faster from 12 on).

FlashAttention-3's explicit ping-pong between the consumers (turn mbarriers) was tried and removed: it measured
10–15% slower on sparse layouts at 128K tokens and equal on dense ones (BENCHMARKS.md, "ping-pong A/B").

The Triton kernel in ``block_sparse.py`` stays the reference implementation for every other case (pointer loads,
other block shapes, GPUs other than Hopper, the interpreter)."""

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

BLOCK = 128
POOL_BOX = 16  # rows of a pooled K/V box (level 8's 16 rows per block; levels 2 and 4 take 4 and 2 boxes a block)
NUM_STAGES = 2  # K/V ring depth: with Q double-buffered per consumer, a third stage would pass 227 KB of shared memory
CONSUMER_REGS = 240
LOADER_REGS = 24
MAXNREG = 168  # 12 warps (two consumer warpgroups + the loader's warpgroup) × 32 threads × 168 ≤ 65,536 registers
RESCALE_LOG2 = gl.constexpr(8.0)  # lazy rescale: a row's running max moves once a block passes it by 2^8
LAZY_MIN_BLOCKS = 24  # rows of at least this many blocks (the layout's width) rescale lazily (``lazy_rescale``)


@gluon.jit
def _softmax(s, m_i, l_i, n, masked, offs_m, offs_nb, lk, off, kp_base, qk_scale, bias, CAUSAL: gl.constexpr,
             HAS_KPOS: gl.constexpr, PYRAMID: gl.constexpr):
    """Online-softmax step on raw scores ``s`` of key block ``n`` (element mask when ``masked``: columns from
    ``lk`` on, and causal ones); returns P (fp32), the factor that rescales the accumulator, and the new running max
    (scaled log2 domain) and sum. With ``HAS_KPOS`` the causal mask compares the keys' original positions
    (``kp_base``: the K/V head's int32 positions, read only for masked blocks) with the rows' (row + ``off``). With
    ``PYRAMID`` the scaled logits get + ``bias`` (log2 p for a tile of keys pooled p to one, 0 for exact keys),
    carried in the row max rather than added to each score."""
    if masked:
        s = _mask(s, n, offs_m, offs_nb, lk, off, kp_base, CAUSAL, HAS_KPOS)
    if PYRAMID:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale + bias)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at -inf, never NaN
    if PYRAMID:
        p = gl.exp2(s * qk_scale - (m_sub - bias)[:, None])
    else:
        p = gl.exp2(s * qk_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _mask(s, n, offs_m, offs_nb, lk, off, kp_base, CAUSAL: gl.constexpr, HAS_KPOS: gl.constexpr):
    """Scores of key block ``n`` at -inf where the key lies past ``lk`` or (causal) after the row's position."""
    cols = n * s.shape[1] + offs_nb
    valid = cols[None, :] < lk
    if CAUSAL:
        if HAS_KPOS:
            kp = gl.load(kp_base + cols, mask=cols < lk, other=0)
            valid = valid & (kp[None, :] <= offs_m[:, None] + off)
        else:
            valid = valid & (cols[None, :] <= offs_m[:, None] + off)
    return gl.where(valid, s, float("-inf"))


@gluon.jit
def _softmax_lazy(s, m_i, l_i, n, masked, offs_m, offs_nb, lk, off, kp_base, qk_scale, CAUSAL: gl.constexpr,
                  HAS_KPOS: gl.constexpr):
    """``_softmax`` for a row's later blocks with FlashAttention-4's lazy rescale: the running max moves only where
    a block passes it by more than 2^``RESCALE_LOG2`` (P then stays below 2^8, well inside the 16-bit types and the
    fp32 sums), so the accumulator needs rescaling only when some row moved, which the returned flag says (any row
    of the warpgroup: one cross-warp reduction). Max and sum stay a consistent pair, so the result is the same
    softmax up to rounding."""
    if masked:
        s = _mask(s, n, offs_m, offs_nb, lk, off, kp_base, CAUSAL, HAS_KPOS)
    m_cand = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    grow = (m_cand - m_i) > RESCALE_LOG2  # from -inf: +inf, grows; -inf to -inf: NaN, stays (nothing seen yet)
    m_new = gl.where(grow, m_cand, m_i)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)  # exactly 1 where the max stayed; 0 on a row with nothing seen yet (sums 0)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i, gl.max(grow.to(gl.int32), 0)


@gluon.jit
def _needs_mask(j, n, nfull, row0, lk, off, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, HAS_KPOS: gl.constexpr):
    """Whether key block ``n`` (the row's ``j``-th) has a key that some row from ``row0`` on must not see: past the
    sequence's end, or (causal) after the first row's diagonal. With key positions the row's leading ``nfull``
    blocks are the mask-free ones (``block_sparse.full_prefix``, counted for the tile's first row)."""
    if HAS_KPOS:
        return j >= nfull
    else:
        last = n * BLOCK_N + (BLOCK_N - 1)
        if CAUSAL:
            return (last >= lk) | (last > row0 + off)
        else:
            return last >= lk


@gluon.jit
def _pooled_step(r, c2, c4, c8):
    """The ``r``-th pooled step of a row (after its exact blocks): levels 2, 4, 8 in turn, ``p`` listed blocks of
    level p sharing one 128-key tile. -> (level 0..2, the tile's first listed entry, its entries (≤ p), p)."""
    t2 = (c2 + 1) // 2
    t4 = (c4 + 3) // 4
    if r < t2:
        lvl = 0
        first = r * 2
        left = c2 - first
    elif r < t2 + t4:
        lvl = 1
        first = (r - t2) * 4
        left = c4 - first
    else:
        lvl = 2
        first = (r - t2 - t4) * 8
        left = c8 - first
    p = 2 << lvl
    return lvl, first, gl.minimum(left, p), p


@gluon.jit
def _step(j, cnt, idx_base, s_ik, c2, c4, c8, row0, lk, off, nfull, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
          HAS_KPOS: gl.constexpr, PYRAMID: gl.constexpr):
    """Consumer: the row's ``j``-th step -> (block index for the mask, whether it needs the element mask, the
    column limit of that mask, the logit bias). Exact blocks first; with ``PYRAMID`` then the pooled tiles, whose
    only mask is the tile's unfilled end (their blocks lie wholly before the row's first query)."""
    pooled = False
    if PYRAMID:
        pooled = j >= cnt
    if pooled:
        lvl, _first, used, p = _pooled_step(j - cnt, c2, c4, c8)
        n = 0  # columns 0..BLOCK_N-1 then pass the causal test: the pooled blocks are visible to every row
        masked = used < p
        limit = used * (BLOCK_N // p)
        bias = (lvl + 1).to(gl.float32)  # log2 p
    else:
        n = gl.load(idx_base + j * s_ik)
        masked = _needs_mask(j, n, nfull, row0, lk, off, BLOCK_N, CAUSAL, HAS_KPOS)
        limit = lk
        bias = 0.0
    return n, masked, limit, bias


@gluon.jit
def _tile(t, tiles, BLOCK_M: gl.constexpr, VARLEN: gl.constexpr):
    """Tile ``t`` -> (batch, query head, K/V head, query block, q length, k length, key-block count, index row):
    query heads sharing a K/V head fastest, then query blocks from the last (longest causal row) down."""
    (CNT, IDX, LQ, LK, s_ib, s_ih, s_im, s_cb, s_ch, s_cm, NQ, NK, HK, GROUP, NQB) = tiles
    g = t % GROUP
    r = t // GROUP
    pid_m = NQB - 1 - r % NQB
    bhk = r // NQB
    b = bhk // HK
    hk = bhk % HK
    h = hk * GROUP + g
    if VARLEN:
        lq = gl.load(LQ + b)
        lk = gl.load(LK + b)
    else:
        lq = NQ
        lk = NK
    cnt = gl.load(CNT + b * s_cb + h * s_ch + pid_m * s_cm)
    cnt = cnt * (pid_m * BLOCK_M < lq).to(gl.int32)  # a tile past the sequence computes nothing (and writes zeros)
    return b, h, hk, pid_m, lq, lk, cnt, IDX + b * s_ib + h * s_ih + pid_m * s_im


@gluon.jit
def _pooled_counts(b, h, pid_m, lq, pyr, BLOCK_M: gl.constexpr, PYRAMID: gl.constexpr):
    """A tile's listed blocks at pooling levels 2, 4, 8 (0 past the sequence) and the steps they take: ⌈c_p / p⌉
    tiles of 128 pooled keys per level."""
    if PYRAMID:
        (_kpd, _vpd, _PIDX, PCNT, _s_pil, _s_pib, _s_pih, _s_pim, _s_pik, s_pcl, s_pcb, s_pch, s_pcm, _PR, _o2, _o4,
         _o8) = pyr
        live = (pid_m * BLOCK_M < lq).to(gl.int32)
        base = PCNT + b * s_pcb + h * s_pch + pid_m * s_pcm
        c2 = gl.load(base) * live
        c4 = gl.load(base + s_pcl) * live
        c8 = gl.load(base + 2 * s_pcl) * live
        return c2, c4, c8, (c2 + 1) // 2 + (c4 + 3) // 4 + (c8 + 7) // 8
    else:
        return 0, 0, 0, 0


@gluon.jit
def _load_pooled(r, c2, c4, c8, b, h, hk, pid_m, HK, pyr, bufs, bar, V: gl.constexpr, BLOCK_N: gl.constexpr):
    """Loader: the ``r``-th pooled step's K (or, ``V``, its V) tile into ``bufs``: for each of its listed blocks at
    level p, that block's 128/p pooled rows, in TMA boxes of ``POOL_BOX`` rows (the boxes past the tile's last
    block repeat it, and the consumers mask those columns)."""
    (kp_desc, vp_desc, PIDX, _PCNT, s_pil, s_pib, s_pih, s_pim, s_pik, _s_pcl, _s_pcb, _s_pch, _s_pcm, PR, off2, off4,
     off8) = pyr
    BOX: gl.constexpr = kp_desc.block_type.shape[0]
    lvl, first, used, p = _pooled_step(r, c2, c4, c8)
    sub = BLOCK_N // p  # pooled rows per listed block
    per = sub // BOX  # boxes per listed block
    if lvl == 0:
        head_row = (b * HK + hk) * PR + off2
    elif lvl == 1:
        head_row = (b * HK + hk) * PR + off4
    else:
        head_row = (b * HK + hk) * PR + off8
    pidx = PIDX + lvl * s_pil + b * s_pib + h * s_pih + pid_m * s_pim
    for i in gl.static_range(BLOCK_N // BOX):
        n = gl.load(pidx + (first + gl.minimum(i // per, used - 1)) * s_pik)
        row = head_row + n * sub + (i % per) * BOX
        if V:
            tma.async_copy_global_to_shared(vp_desc, [row, 0], bar, bufs.slice(i * BOX, BOX))
        else:
            tma.async_copy_global_to_shared(kp_desc, [row, 0], bar, bufs.slice(i * BOX, BOX))


@gluon.jit
def _load_block(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, slot, phase, row):
    """Loader: the key block at K/V row ``row`` into ring ``slot``, once the consumers have released it."""
    mbarrier.wait(k_empty.index(slot), phase ^ 1)
    mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(slot), k_bufs.index(slot))
    mbarrier.wait(v_empty.index(slot), phase ^ 1)
    mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(slot), v_bufs.index(slot))


@gluon.jit
def _publish_tile(tile_ids, t_ready, t_empty, k, t):
    """Loader: hand tile ``t`` (the ``k``-th of this program) to the consumers through a two-deep shared ring."""
    slot = k % 2
    mbarrier.wait(t_empty.index(slot), ((k // 2) & 1) ^ 1)  # fresh barriers count as a completed phase 1
    tile_ids.index(slot).store(gl.full([1], t, gl.int32, gl.BlockedLayout([1], [32], [gl.num_warps()], [0])))
    mbarrier.arrive(t_ready.index(slot), count=1)


@gluon.jit
def _take_tile(tile_ids, t_ready, t_empty, k):
    """Consumer: the ``k``-th tile the loader handed out (a value ≥ the tile count ends the program)."""
    slot = k % 2
    mbarrier.wait(t_ready.index(slot), (k // 2) & 1)
    t = gl.max(tile_ids.index(slot).load(gl.BlockedLayout([1], [32], [gl.num_warps()], [0])), 0)
    mbarrier.arrive(t_empty.index(slot), count=1)
    return t


@gluon.constexpr_function
def _store_layout(HEAD_DIM):
    """Registers for a coalesced store of [64, HEAD_DIM] by one warpgroup: 8 contiguous elements (16 bytes) per
    thread, a row's threads side by side."""
    return gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])


@gluon.jit
def _store_lse(m_i, l_i, LSE, b, h, row0, lq, NQ, s_lb, s_lh, BM: gl.constexpr, S_L: gl.constexpr):
    """The natural-log sum of exp(scale · q·k) per row; -inf for a row that saw no key or is past the length."""
    offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, S_L))
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    lse = gl.where((l_i == 0.0) | (offs_m >= lq), float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    gl.store(LSE + b * s_lb + h * s_lh + offs_m, lse, mask=offs_m < NQ)


@gluon.jit
def _out_ptrs(O, b, h, row0, r, offs_d, s_ob, s_oh, s_om):
    """A tile's output addresses (rows row0 + r): the tile's first row in int64, since Triton passes strides below
    2^31 as int32 and 28 heads of 600K tokens (or a [B, N, H, D] view's rows past 600K) pass 2^31 elements; the
    offsets within the tile stay int32."""
    base = O + (b.to(gl.int64) * s_ob + h.to(gl.int64) * s_oh + row0.to(gl.int64) * s_om)
    return base + r[:, None] * s_om + offs_d[None, :]


@gluon.jit
def _epilogue(acc, m_i, l_i, o_s, OUT, LSE, b, h, row0, lq, NQ, H, s_ob, s_oh, s_om, s_lb, s_lh,
              BM: gl.constexpr, HEAD_DIM: gl.constexpr, O_L: gl.constexpr, S_L: gl.constexpr,
              RETURN_LSE: gl.constexpr):
    """Normalise and store one consumer's 64 rows of a tile (zeros past the sequence's length). The rows go through
    shared memory ``o_s`` (the tile's own Q buffer, free once its last Q·Kᵀ is done). With an output descriptor
    (``OUT`` = (pointer, descriptor or None)) a tile whose rows all lie inside the sequence leaves through one TMA
    store; the others, in a layout whose stores are 16 bytes per thread and whole rows per warp (stored straight from
    the MMA layout they were 2-byte stores, and the store unit's backlog stalled the next tile's softmax)."""
    (O, o_desc) = OUT
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, O_L))[:, None]
    o_s.store(out.to(o_s.dtype))
    if o_desc is not None:
        if row0 + BM <= lq:
            fence_async_shared()  # the rows the threads wrote, visible to the tensor-memory accelerator
            gl.thread_barrier()
            tma.async_copy_shared_to_global(o_desc, [(b * H + h) * NQ + row0, 0], o_s)
            tma.store_wait(0)  # ... read out of the buffer before it is handed back for a later tile's Q
            gl.thread_barrier()
        else:
            _store_rows(o_s, O, b, h, row0, lq, NQ, s_ob, s_oh, s_om, BM, HEAD_DIM)
    else:
        _store_rows(o_s, O, b, h, row0, lq, NQ, s_ob, s_oh, s_om, BM, HEAD_DIM)
    if RETURN_LSE:
        _store_lse(m_i, l_i, LSE, b, h, row0, lq, NQ, s_lb, s_lh, BM, S_L)


@gluon.jit
def _store_rows(o_s, O, b, h, row0, lq, NQ, s_ob, s_oh, s_om, BM: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A consumer's 64 output rows from shared memory, 16 bytes per thread (zeros past the sequence's length)."""
    gl.thread_barrier()  # this warpgroup's rows are all in shared memory
    ST_L: gl.constexpr = _store_layout(HEAD_DIM)
    vals = o_s.load(ST_L)
    gl.thread_barrier()  # ... and all read back before the buffer is handed back for a later tile's Q
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, ST_L))
    rows = row0 + r
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ST_L))
    vals = gl.where(rows[:, None] < lq, vals, gl.zeros_like(vals))
    gl.store(_out_ptrs(O, b, h, row0, r, offs_d, s_ob, s_oh, s_om), vals, mask=rows[:, None] < NQ)


@gluon.jit
def _store_zeros(m_none, l_none, OUT, LSE, b, h, row0, lq, NQ, s_ob, s_oh, s_om, s_lb, s_lh, BM: gl.constexpr,
                 HEAD_DIM: gl.constexpr, S_L: gl.constexpr, RETURN_LSE: gl.constexpr):
    """A consumer's 64 rows of a tile with nothing to compute (an empty row, or a tile past the sequence): zeros
    (log-sum-exp -inf)."""
    (O, _o_desc) = OUT
    ST_L: gl.constexpr = _store_layout(HEAD_DIM)
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, ST_L))
    rows = row0 + r
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ST_L))
    zeros = gl.zeros([BM, HEAD_DIM], O.dtype.element_ty, ST_L)
    gl.store(_out_ptrs(O, b, h, row0, r, offs_d, s_ob, s_oh, s_om), zeros, mask=rows[:, None] < NQ)
    if RETURN_LSE:
        _store_lse(m_none, l_none, LSE, b, h, row0, lq, NQ, s_lb, s_lh, BM, S_L)


@gluon.jit
def _consumer(args, WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr,
              HAS_KPOS: gl.constexpr, PYRAMID: gl.constexpr, LAZY: gl.constexpr):
    """One consumer warpgroup's 64 rows of each tile. A tile's last P·V product is left in flight and issued beside
    the next tile's first Q·Kᵀ, whose softmax then overlaps it; that tile's epilogue follows."""
    (q_desc, _k_desc, _v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, tiles,
     tile_ids, t_ready, t_empty, _COUNTER, O, LSE, s_ob, s_oh, s_om, s_lb, s_lh, s_ik, H, NQ, _NK, _HK, ntiles,
     qk_scale, KPOS, NFULL, s_kpb, s_kph, s_fb, s_fh, s_fm, kpos_off, pyr) = args
    BM: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_desc.dtype
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
    offs_nb = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
    s_zero = gl.zeros([BM, BLOCK_N], gl.float32, S_L)
    m_none = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
    l_none = gl.zeros([BM], gl.float32, gl.SliceLayout(1, S_L))
    acc_none = gl.zeros([BM, HEAD_DIM], gl.float32, O_L)
    it = 0  # K/V ring position, shared with the loader
    qi = 0  # Q loads so far (tiles with work)
    # the previous tile, whose last P·V product is pending: its P, accumulator, softmax state, ring position, place
    has_prev = 0
    p = gl.zeros([BM, BLOCK_N], dtype, P_L)
    acc = acc_none
    m_i = m_none
    l_i = l_none
    pc = 0
    pqb = 0  # its Q buffer: the epilogue stages the output there, then hands it back to the loader
    pb = 0
    ph = 0
    prow0 = 0
    plq = 0
    k = 0  # tiles taken
    t = _take_tile(tile_ids, t_ready, t_empty, k)
    while t < ntiles:
        b, h, hk, pid_m, lq, lk, cnt, idx_base = _tile(t, tiles, BLOCK_M, VARLEN)
        if HAS_KPOS:
            kp_base = KPOS + b * s_kpb + hk * s_kph
            off = kpos_off  # query i sits at key position i + kpos_off
            nfull = gl.load(NFULL + b * s_fb + h * s_fh + pid_m * s_fm)
        else:
            kp_base = KPOS  # None: the launch passes no key positions
            off = lk - lq  # bottom-right causal alignment
            nfull = 0
        c2, c4, c8, pooled_steps = _pooled_counts(b, h, pid_m, lq, pyr, BLOCK_M, PYRAMID)
        steps = cnt + pooled_steps
        row0 = pid_m * BLOCK_M + WG * BM  # this warpgroup's first query row
        offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, S_L))
        if steps > 0:
            qb = WG * 2 + qi % 2  # Q is double-buffered: the loader fetches the next tile's while this one runs
            mbarrier.wait(q_ready.index(qb), (qi // 2) & 1)
            q_s = q_bufs.index(qb)
            slot = it % STAGES
            # the block's index (for its mask), loaded while the scores are computed
            n, masked, limit, bias = _step(0, cnt, idx_base, s_ik, c2, c4, c8, row0, lk, off, nfull, BLOCK_N, CAUSAL,
                                           HAS_KPOS, PYRAMID)
            mbarrier.wait(k_ready.index(slot), (it // STAGES) & 1)
            if has_prev:  # this tile's first Q·Kᵀ beside the previous tile's last P·V; its softmax overlaps the latter
                last = pc % STAGES
                mbarrier.wait(v_ready.index(last), (pc // STAGES) & 1)
                s = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                acc = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
                mbarrier.arrive(k_empty.index(slot), count=1)
                p32, alpha, m_new, l_new = _softmax(s, m_none, l_none, n, masked, offs_m, offs_nb, limit, off,
                                                    kp_base, qk_scale, bias, CAUSAL, HAS_KPOS, PYRAMID)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(v_empty.index(last), count=1)
                _epilogue(acc, m_i, l_i, q_bufs.index(pqb), O, LSE, pb, ph, prow0, plq, NQ, H, s_ob, s_oh, s_om,
                          s_lb, s_lh, BM, HEAD_DIM, O_L, S_L, RETURN_LSE)
                mbarrier.arrive(q_empty.index(pqb), count=1)
            else:
                s = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
                mbarrier.arrive(k_empty.index(slot), count=1)
                p32, alpha, m_new, l_new = _softmax(s, m_none, l_none, n, masked, offs_m, offs_nb, limit, off,
                                                    kp_base, qk_scale, bias, CAUSAL, HAS_KPOS, PYRAMID)
            m_i = m_new
            l_i = l_new
            acc = acc_none
            p = gl.convert_layout(p32.to(dtype), P_L)
            for j in range(1, steps):
                c = it + j
                slot = c % STAGES
                prev = (c - 1) % STAGES
                n, masked, limit, bias = _step(j, cnt, idx_base, s_ik, c2, c4, c8, row0, lk, off, nfull, BLOCK_N,
                                               CAUSAL, HAS_KPOS, PYRAMID)
                # Q·K_jᵀ goes first, then P_{j-1}·V_{j-1}; the softmax of block j overlaps the latter
                mbarrier.wait(k_ready.index(slot), (c // STAGES) & 1)
                mbarrier.wait(v_ready.index(prev), ((c - 1) // STAGES) & 1)
                s = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                acc = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
                mbarrier.arrive(k_empty.index(slot), count=1)
                if LAZY:
                    p32, alpha, m_i, l_i, moved = _softmax_lazy(s, m_i, l_i, n, masked, offs_m, offs_nb, limit, off,
                                                                kp_base, qk_scale, CAUSAL, HAS_KPOS)
                else:
                    p32, alpha, m_i, l_i = _softmax(s, m_i, l_i, n, masked, offs_m, offs_nb, limit, off, kp_base,
                                                    qk_scale, bias, CAUSAL, HAS_KPOS, PYRAMID)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(v_empty.index(prev), count=1)
                if LAZY:
                    if moved > 0:  # most blocks: once a row's max settles it rarely grows by 2^8
                        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
                else:
                    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
                p = gl.convert_layout(p32.to(dtype), P_L)
            qi += 1
            pqb = qb
            pc = it + steps - 1
            it += steps
            has_prev = 1
            pb = b
            ph = h
            prow0 = row0
            plq = lq
        else:  # nothing to compute (an empty row, or a tile past the sequence): zeros
            _store_zeros(m_none, l_none, O, LSE, b, h, row0, lq, NQ, s_ob, s_oh, s_om, s_lb, s_lh, BM, HEAD_DIM, S_L,
                         RETURN_LSE)
        k += 1
        t = _take_tile(tile_ids, t_ready, t_empty, k)
    if has_prev:  # the last tile's last P·V product and epilogue
        last = pc % STAGES
        mbarrier.wait(v_ready.index(last), (pc // STAGES) & 1)
        acc = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(last), count=1)
        _epilogue(acc, m_i, l_i, q_bufs.index(pqb), O, LSE, pb, ph, prow0, plq, NQ, H, s_ob, s_oh, s_om, s_lb,
                  s_lh, BM, HEAD_DIM, O_L, S_L, RETURN_LSE)


@gluon.jit
def _consumer0(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
               RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_KPOS: gl.constexpr,
               PYRAMID: gl.constexpr, LAZY: gl.constexpr):
    _consumer(args, 0, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, VARLEN, HAS_KPOS, PYRAMID, LAZY)


@gluon.jit
def _consumer1(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
               RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_KPOS: gl.constexpr,
               PYRAMID: gl.constexpr, LAZY: gl.constexpr):
    _consumer(args, 1, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, VARLEN, HAS_KPOS, PYRAMID, LAZY)


@gluon.jit
def _loader(args, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
            RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_KPOS: gl.constexpr,
            PYRAMID: gl.constexpr):
    (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, tiles,
     tile_ids, t_ready, t_empty, COUNTER, _O, _LSE, _s_ob, _s_oh, _s_om, _s_lb, _s_lh, s_ik, H, NQ, NK, HK,
     ntiles, _qk_scale, _KPOS, _NFULL, _s_kpb, _s_kph, _s_fb, _s_fh, _s_fm, _kpos_off, pyr) = args
    BM: gl.constexpr = BLOCK_M // 2
    it = 0
    qi = 0
    k = 0
    # dynamic schedule: a program's first tile is its id, then it claims the next unclaimed one (claimed a tile
    # ahead, so the atomic's latency hides behind the current tile's loads)
    t = gl.program_id(0)
    nxt = gl.atomic_add(COUNTER, 1) + gl.num_programs(0)
    while t < ntiles:
        _publish_tile(tile_ids, t_ready, t_empty, k, t)
        k += 1
        b, h, hk, pid_m, lq, _lk, cnt, idx_base = _tile(t, tiles, BLOCK_M, VARLEN)
        c2, c4, c8, pooled_steps = _pooled_counts(b, h, pid_m, lq, pyr, BLOCK_M, PYRAMID)
        steps = cnt + pooled_steps
        if steps > 0:
            q_row = (b * H + h) * NQ + pid_m * BLOCK_M
            for wg in gl.static_range(2):
                qb = wg * 2 + qi % 2
                mbarrier.wait(q_empty.index(qb), ((qi // 2) & 1) ^ 1)  # fresh barriers count as a completed phase 1
                mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [q_row + wg * BM, 0], q_ready.index(qb), q_bufs.index(qb))
            qi += 1
            kv_row0 = (b * HK + hk) * NK
            for j in range(steps):
                c = it + j
                slot = c % STAGES
                phase = (c // STAGES) & 1
                # the pooled path is built only with PYRAMID (without it the pooled descriptors are None)
                if PYRAMID:
                    if j >= cnt:  # a tile of pooled keys: the same bytes as a block, in 16-row boxes
                        mbarrier.wait(k_empty.index(slot), phase ^ 1)
                        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
                        _load_pooled(j - cnt, c2, c4, c8, b, h, hk, pid_m, HK, pyr, k_bufs.index(slot),
                                     k_ready.index(slot), False, BLOCK_N)
                        mbarrier.wait(v_empty.index(slot), phase ^ 1)
                        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
                        _load_pooled(j - cnt, c2, c4, c8, b, h, hk, pid_m, HK, pyr, v_bufs.index(slot),
                                     v_ready.index(slot), True, BLOCK_N)
                    else:
                        _load_block(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, slot, phase,
                                    kv_row0 + gl.load(idx_base + j * s_ik) * BLOCK_N)
                else:
                    _load_block(k_desc, v_desc, k_bufs, v_bufs, k_ready, k_empty, v_ready, v_empty, slot, phase,
                                kv_row0 + gl.load(idx_base + j * s_ik) * BLOCK_N)
            it += steps
        t = nxt
        if t < ntiles:
            nxt = gl.atomic_add(COUNTER, 1) + gl.num_programs(0)
    _publish_tile(tile_ids, t_ready, t_empty, k, t)  # past the last tile: the consumers stop


@gluon.jit
def _fwd(q_desc, k_desc, v_desc, kp_desc, vp_desc, O, o_desc, LSE, IDX, CNT, LQ, LK, COUNTER, KPOS, NFULL, PIDX, PCNT,
         s_ob, s_oh, s_om, s_lb, s_lh, s_ib, s_ih, s_im, s_ik, s_cb, s_ch, s_cm, s_kpb, s_kph, s_fb, s_fh, s_fm,
         s_pil, s_pib, s_pih, s_pim, s_pik, s_pcl, s_pcb, s_pch, s_pcm,
         NQ, NK, H, HK, GROUP, NQB, ntiles, qk_scale, kpos_off, PR, off2, off4, off8,
         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
         RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr, HAS_KPOS: gl.constexpr,
         PYRAMID: gl.constexpr, LAZY: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    BM: gl.constexpr = BLOCK_M // 2
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [4, BM, HEAD_DIM], q_desc.layout)  # [consumer × 2 tiles]
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(4):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    tile_ids = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    t_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    t_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(t_ready.index(i), count=1)
        mbarrier.init(t_empty.index(i), count=2)  # both consumers read a tile id
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a slot
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    tiles = (CNT, IDX, LQ, LK, s_ib, s_ih, s_im, s_cb, s_ch, s_cm, NQ, NK, HK, GROUP, NQB)
    args = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
            tiles, tile_ids, t_ready, t_empty, COUNTER, (O, o_desc), LSE, s_ob, s_oh, s_om, s_lb, s_lh, s_ik, H, NQ,
            NK, HK, ntiles, qk_scale, KPOS, NFULL, s_kpb, s_kph, s_fb, s_fh, s_fm, kpos_off,
            (kp_desc, vp_desc, PIDX, PCNT, s_pil, s_pib, s_pih, s_pim, s_pik, s_pcl, s_pcb, s_pch, s_pcm, PR, off2,
             off4, off8))
    gl.warp_specialize([(_consumer0, (args, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, VARLEN, HAS_KPOS,
                                      PYRAMID, LAZY)),
                        (_consumer1, (args, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, VARLEN, HAS_KPOS,
                                      PYRAMID, LAZY)),
                        (_loader, (args, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, STAGES, VARLEN, HAS_KPOS,
                                   PYRAMID))],
                       [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _tma_ready(t2):
    """A 2-D [rows, D] view the tensor-memory accelerator can read: contiguous and 16-byte aligned, else a copy."""
    return t2 if t2.is_contiguous() and t2.data_ptr() % 16 == 0 else t2.clone(memory_format=torch.contiguous_format)


TRITON_MIN = (3, 6)  # gl.warp_specialize taking a list of (partition, args): 3.5 has the Hopper API but not that


def triton_supported(version: str | None = None) -> bool:
    """Whether this Triton (or ``version``) compiles the kernel. Triton 3.5 imports the Gluon Hopper API the kernel
    uses but its ``warp_specialize`` has another signature, so the build failed there; 3.4 lacks
    ``warpgroup_mma`` (an ImportError)."""
    from .fit import triton_at_least

    return triton_at_least(TRITON_MIN, version)


def supported(q, k, v, block_q: int, block_k: int, scale: float) -> bool:
    """Whether the kernel can run this call on a Hopper GPU (``block_sparse._hopper_fits`` checks the device):
    128×128 blocks, bf16/fp16, head dim 64 or 128, a positive scale. (Non-contiguous inputs — a model's q/k/v are
    usually transposed views — are copied.)"""
    return (block_q == block_k == BLOCK and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == v.dtype == q.dtype and q.shape[-1] in (64, 128) and scale > 0)


def _sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors: the persistent launch's program count."""
    from .fit import sm_count

    return sm_count(device)


@functools.cache
def _smem_layouts(d: int, bf16: bool):
    gdt = gl.bfloat16 if bf16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([BLOCK // 2, d], gdt),
            gl.NVMMASharedLayout.get_default_for([BLOCK, d], gdt))


def block_sparse_attention_hopper(q, k, v, kv_index, kv_count, causal: bool, scale: float, seqlens_q=None,
                                  seqlens_k=None, return_lse: bool = False, consumer_regs: int = CONSUMER_REGS,
                                  persistent: bool = True, *, key_pos=None, query_offset=None, pooled=None,
                                  nfull=None, lazy_rescale: bool | None = None):
    """q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (copied when not contiguous or not 16-byte aligned, as TMA needs); kv_index
    int32 [B|1, H|1, NQ, K] (each row's key blocks, ascending) and kv_count int32 [B|1, H|1, NQ];
    ``seqlens_q``/``seqlens_k`` int [B], clamped into [0, N] (rows past them are zeros).
    ``key_pos`` int [B, Hkv, Nk]: the keys' original positions for the causal mask (permuted or gathered keys, as
    ``block_sparse.block_sparse_attention`` takes them), query i at position i + ``query_offset`` (default Nk − Nq); the
    mask-free blocks are then the row's leading run counted by ``full_prefix``, or ``nfull`` (int32 [B|1, H|1, NQ])
    where the caller already knows it. ``pooled``: the pyramid levels 2, 4, 8 as (index int32 [3, B|1, H|1, NQ, W],
    count int32 [3, B|1, H|1, NQ]), attended after the exact blocks through mean-pooled K/V (logit bias ln p, no element
    mask: each must lie wholly before its query block's first query). ``persistent=False`` launches one program per tile
    instead of one per SM (for comparison: the hardware then schedules the tiles). ``lazy_rescale``: FlashAttention-4's
    lazy rescale of the accumulator (``_softmax_lazy``); by default where the layout's rows reach ``LAZY_MIN_BLOCKS``
    blocks (its width); never with pooled levels or key positions."""
    from .block_sparse import LOG2E, _bcast_strides, clamped_lengths, full_prefix, pooled_args

    if pooled is not None and key_pos is not None:
        raise ValueError("pooled levels and key positions do not combine")
    if pooled is not None and k.shape[2] < BLOCK:  # no whole key block: nothing can be listed pooled
        pooled = None

    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    q_layout, kv_layout = _smem_layouts(d, q.dtype == torch.bfloat16)
    q2, k2, v2 = (_tma_ready(t.reshape(-1, d)) for t in (q, k, v))
    qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BLOCK // 2, d], q_layout)
    kd = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BLOCK, d], kv_layout)
    vd = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BLOCK, d], kv_layout)
    out = torch.empty_like(q)  # every row is written (zeros past a sequence's length)
    if out.stride(-1) != 1:  # the epilogue stores 16-byte runs of a row
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # [B, H, Nq, D] rows one after another (as q is, mostly): whole tiles leave through a TMA store of [B·H·Nq, D]
    od = TensorDescriptor(out.view(-1, d), [b * h * nq, d], [d, 1], [BLOCK // 2, d], q_layout) \
        if out.is_contiguous() else None
    # what a call does not use goes in as None: Triton makes it a constant of the build (the flags below already
    # pick the build), so the launch neither passes nor checks it; about half the arguments at a plain call
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device) if return_lse else None
    s_lse = (lse.stride(0), lse.stride(1)) if return_lse else (None, None)
    varlen = seqlens_q is not None or seqlens_k is not None
    lq = lk = None
    if varlen or key_pos is not None:
        lq, lk = clamped_lengths(seqlens_q, b, nq, q.device), clamped_lengths(seqlens_k, b, nk, q.device)
    if key_pos is not None:  # the rows' mask-free leading blocks, and the positions the masked ones compare
        kpos_off = (nk - nq) if query_offset is None else int(query_offset)
        if nfull is None:
            nfull = full_prefix(kv_index, kv_count, BLOCK, BLOCK, causal, lq, lk, key_pos, h // hk, kpos_off)
        kpos = key_pos.to(torch.int32)
        kpos = kpos if kpos.stride(-1) == 1 else kpos.contiguous()
        s_kpos, s_full = _bcast_strides(kpos, 2), _bcast_strides(nfull, 3)
    else:
        nfull = kpos = kpos_off = None
        s_kpos, s_full = [None] * 2, [None] * 3
    if pooled is not None:  # the levels' pooled K/V, stacked per K/V head; read in 16-row boxes
        pidx, pcnt, kp, vp, offs, s_pidx, s_pcnt = pooled_args(k, v, pooled, BLOCK)
        pr = kp.shape[2]
        kp2, vp2 = kp.reshape(-1, d), vp.reshape(-1, d)
        kpd = TensorDescriptor(kp2, list(kp2.shape), list(kp2.stride()), [POOL_BOX, d], kv_layout)
        vpd = TensorDescriptor(vp2, list(vp2.shape), list(vp2.stride()), [POOL_BOX, d], kv_layout)
    else:
        pidx = pcnt = kpd = vpd = pr = None
        offs, s_pidx, s_pcnt = [None] * 3, [None] * 5, [None] * 4
    nqb = triton.cdiv(nq, BLOCK)
    ntiles = b * h * nqb
    grid = (min(ntiles, _sm_count(q.device)) if persistent else ntiles,)
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)  # the dynamic schedule's next unclaimed tile
    if lazy_rescale is None:
        lazy_rescale = kv_index.shape[-1] >= LAZY_MIN_BLOCKS
    lazy = bool(lazy_rescale) and pooled is None and key_pos is None  # with either, its build spills registers
    _fwd[grid](
        qd, kd, vd, kpd, vpd, out, od, lse, kv_index, kv_count, lq if varlen else None, lk if varlen else None,
        counter, kpos, nfull, pidx, pcnt, *out.stride()[:3], *s_lse,
        *_bcast_strides(kv_index, 4), *_bcast_strides(kv_count, 3), *s_kpos, *s_full, *s_pidx, *s_pcnt,
        nq, nk, h, hk, h // hk, nqb, ntiles, scale * LOG2E, kpos_off, pr, *offs,
        HEAD_DIM=d, BLOCK_M=BLOCK, BLOCK_N=BLOCK, CAUSAL=causal, RETURN_LSE=return_lse, STAGES=NUM_STAGES,
        VARLEN=varlen, HAS_KPOS=key_pos is not None, PYRAMID=pooled is not None, LAZY=lazy,
        CONSUMER_REGS=consumer_regs, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )
    return (out, lse) if return_lse else out
