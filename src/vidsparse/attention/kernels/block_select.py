"""Per-row block selection in one Triton kernel: ``patterns.base.topk_layout``'s forced/causal bias, its top-k and
the ascending order of the kept indices, for one row of pooled block scores per program.

Each score becomes an order-preserving 32-bit integer (forced blocks — sink, diagonal — rank as +inf, blocks past
the causal diagonal as -inf, exactly as the torch path biases them). A 32-step binary search on that integer finds
the row's ``total``-th largest value (each step one count over the row, in registers); the blocks above it, and the
lowest-indexed ones equal to it up to ``total``, are kept and written in ascending order through a prefix sum.
Replaces torch's radix top-k (four passes over the scores), the bias add and the index sort — about 1 ms of
``block_topk``'s 2.2 ms estimation at 128K tokens on an H100 (``benchmarks/profile_estimation.py``). (A first
version ranked each row with an in-register bitonic sort of (score, index) pairs: slower than torch's top-k at 1,024
key blocks.) The keys are int32, compared with an int32 midpoint: with int64 keys the kernel took 0.361 ms per
``block_topk`` call at 128K and ``select_levels`` 1.697 ms per ``pyramid`` call, with int32 0.324 and 1.448 ms
(``profile_select_{old,new}_131072.json``, same selections).

Two later changes, each measured on an H200 against the one before in one process (``benchmarks/profile_estimation.py
--env-ab``): causal rows whose diagonal falls in the first quarter or half of the key blocks run in narrower
launches (``_row_groups``; ``block_topk`` at 5% and 128K tokens 0.85 → 0.78 ms, ``pyramid`` 2.69 → 2.17 ms,
``profile_estimation_selectsplit_*.json``), and ``block_topk``'s rows that pick at most ``FEW`` blocks beyond the
forced ones take that many rounds of one int64 max-reduction instead of the 32 counting steps (``_top_few``;
``block_topk``'s whole estimate at 5% 0.154 → 0.139 ms at 32K, 0.303 → 0.288 ms at 64K, 0.719 → 0.702 ms at 128K;
``FEW`` of 8, 16 and 32 compared, 16 fastest at every size, ``profile_estimation_selectfew_*.json``).

Tried and reverted (commit de15fe5, ``profile_estimation_selectradix_*.json``, H200, in-process A/B):
radix rounds of 2- or 4-bit digits in place of the binary searches — one [2^bits, W] reduction per round, 16 or 8
rounds instead of 31-32. Slower at every size: ``block_cdf`` 0.99 → 1.65 / 2.88 ms at 128K, ``block_topk`` 10%
0.71 → 1.08 / 1.74 ms, ``pyramid`` 1.95 → 8.4 / 5.5 ms. The wider reductions raise the registers (``_select_mass``
37 → 62 / 121 at 256 key blocks, spills at 1,024) and the rows, thousands per launch, are bound by throughput, not
by the latency of the rounds.

Layouts up to ``SHARED_UP_TO`` key blocks wide (16K tokens in 128-token blocks) run ``select_mass`` and
``select_levels`` with several rows per program (``_select_mass_rows``, ``_levels_rows``: an [R, W] tile, 8 rows of
128 blocks, each search step reducing all of them at once) instead of one: at 16K a row program's 32-step searches
reduce only 128 entries over two warps each, and 3,584 such programs at 28 heads took ``pyramid``'s four nested
searches 0.05 ms. Measured on an H200 at 16K, 28/4 heads, random q/k, against a8c3651's one row per program in
one process (``benchmarks/profile_estimation.py --module-ab vidsparse.attention.kernels.block_select=FILE``, FILE
that commit's copy of this module; GPU ms of the whole estimate, ``profile_estimation_s111_sel_*.json``): ``pyramid``
0.0831 → 0.0670, ``block_cdf`` 0.0921 → 0.0828, ``xattention`` at stride 8 0.2844 → 0.2744; rows of 512, 1,024
and 2,048 entries per program 0.083 / 0.075 / 0.077 ms for ``pyramid``, two warps ahead of four and eight
(``profile_estimation_s110_{rows,warps}_16384.json``, measured on the generic version below, whose 16K path is these
kernels'). Not taken: the same for ``block_topk``'s ``_select`` (0.0431 → 0.0457 ms at 16K, slower), for the
narrower causal launches of wider layouts (``pyramid`` at 32K 0.1701 → 0.1904 ms with ``select_levels`` passing
each launch's width to ``_rows_per`` instead of the layout's, ``profile_estimation_s111_sel_32768.json``) and one
generic version for every width (per-row values as [1] tensors for one row per program: 128K tokens ``block_topk``
0.572 → 0.782 ms, ``pyramid`` 1.678 → 1.752; ``profile_estimation_s110_sel_*.json``; branch ``tried-2026-11-29``,
commit bb1d7e3). Nor did ranking a 128-block row by comparing all its pairs in one [W, W] tile
instead of four searches (the same branch, commit 01850b8, switched by ``VIDSPARSE_SELECT_PAIRS``: ``pyramid``
0.0882 against 0.0892 ms at 16K, ``profile_estimation_s109_pairs_*.json``).

``select_levels`` does the same for ``pyramid``'s rank mode: four nested searches give each block its level (exact,
2×, 4×, 8× pooled, skipped) and four compactions write the levels' layouts, in place of a full sort of every row,
a scatter of the levels back and four mask-to-index conversions."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .fit import env_int

SPLIT_FROM = 256  # padded row widths (key blocks) from which causal rows run in narrower launches (``_row_groups``)
FEW = 16  # rows picking at most this many blocks beyond the forced ones take ``_top_few`` (VIDSPARSE_SELECT_FEW)
SHARED_UP_TO = 128  # rows up to this width share programs in ``select_mass`` and ``select_levels`` (``_rows_per``)
ROW_ENTRIES = 1024  # entries per such program: 8 rows of 128 blocks (VIDSPARSE_SELECT_ROWS)


def _warps(w: int) -> int:
    """Warps per row program: ``VIDSPARSE_SELECT_WARPS`` when set (a tuning knob), else 2 up to 1,024 key blocks and
    4 beyond. Measured on an H100 at 1,024 key blocks (``benchmarks/profile_estimation.py --select-warps 1,2,4``):
    block_topk's estimation 1.05 / 1.07 / 1.11 ms with 1 / 2 / 4 warps, pyramid's 2.85 / 2.74 / 3.47 ms. (Beyond
    1,024 key blocks unmeasured: twice the warps for twice the row.)"""
    return env_int("VIDSPARSE_SELECT_WARPS", 2 if w <= 1024 else 4, pow2=True)


def _row_groups(nqb: int, nkb: int, block_q: int, block_k: int, q_len: int, k_len: int,
                causal: bool) -> list[tuple[int, int, int]]:
    """(first row, rows, W) per launch: causal rows see only the key blocks up to their diagonal, so the rows whose
    last visible block fits in a quarter (a half) of the padded row width run with that narrower width, in their own
    launch (at most three). The search's work is per padded entry, so causal selection does about 0.69 of the
    one-width work. Rows narrower than ``SPLIT_FROM`` key blocks run in one launch: at 128 (16K tokens in 128-token
    blocks) one launch was 3–8% faster for the whole estimate (``block_topk`` 5% 0.0427 → 0.0391 ms, 10% 0.0449 →
    0.0416, ``pyramid`` 0.0893 → 0.0869; ``profile_estimation_cov2_split_16384.json``), at 256 the split 8% faster
    for ``pyramid``. ``VIDSPARSE_SELECT_SPLIT=0`` launches every row at full width (the A/B baseline)."""
    return _groups(nqb, nkb, block_q, block_k, q_len, k_len, causal,
                   os.environ.get("VIDSPARSE_SELECT_SPLIT") != "0", SPLIT_FROM)


@functools.lru_cache(maxsize=256)
def _groups(nqb, nkb, block_q, block_k, q_len, k_len, causal, split, split_from):
    full = triton.next_power_of_2(max(nkb, 2))
    if not (causal and split) or full < split_from:
        return [(0, nqb, full)]
    groups, start = [], 0
    for w in (full // 4, full // 2):
        end = start
        # rows whose diagonal block (the last they see) is below w, as _row computes it
        while end < nqb and (min((end + 1) * block_q - 1, q_len - 1) + k_len - q_len) // block_k < w:
            end += 1
        if end > start:
            groups.append((start, end - start, w))
        start = end
    if start < nqb:
        groups.append((start, nqb - start, full))
    return groups


@triton.jit
def _order_key(score):
    """float32 -> int32 with the same (signed) order (and -0.0 equal to +0.0, as torch compares them)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _search(key, weight, target, LO: tl.constexpr, STEPS: tl.constexpr):
    """The largest t in [LO, 2^31) whose keys >= t weigh at least ``target`` (``weight``: 1 counts them, a tensor
    sums it), by a ``STEPS``-step binary search (LO when even every key falls short). The bounds are int64 scalars
    (their sum overflows int32); each step compares the int32 keys with an int32 midpoint, which a wider one would
    widen to int64 across the whole row."""
    lo = tl.full([], LO, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(STEPS):
        mid = (lo + hi + 1) >> 1
        ge = tl.sum(tl.where(key >= mid.to(tl.int32), weight, 0), 0) >= target
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _threshold(key, total):
    """The largest t with at least ``total`` keys >= t (the ``total``-th largest key), over the whole int32 range."""
    return _search(key, 1, total, -2147483648, 32)


@triton.jit
def _top(key, total):
    """The ``total`` largest keys, ties to the lowest indices (a stable descending sort's first ``total``)."""
    t = _threshold(key, total)
    above = key > t
    tie = key == t
    room = total - tl.sum(above.to(tl.int32), 0)
    return (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))) & (total > 0)


@triton.jit
def _top_few(key, n, forced, picks, W: tl.constexpr):
    """``_top``'s set for a row whose forced blocks are all kept (+inf keys) and ``picks`` more are wanted, by
    ``picks`` rounds of one max-reduction each over (key, lowest index first) packed in an int64: cheaper than the
    32 counting steps of the search when few blocks are picked (``VIDSPARSE_SELECT_FEW``)."""
    packed = (key.to(tl.int64) << 32) | (W - 1 - n).to(tl.int64)  # larger key first, then the lower index
    keep = forced
    for _ in range(picks):
        best = tl.max(tl.where(keep, -9223372036854775807 - 1, packed), 0)
        keep = keep | (packed == best)
    return keep


@triton.jit
def _emit(keep, full, n, row, frow, width):
    """Write the kept block indices of a row in ascending order, zeros after them, and at ``frow`` whether each needs
    no element mask (``full``: the layout's ``kv_full``, False after them); return their count."""
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    count = tl.sum(keep.to(tl.int32), 0)
    tl.store(row + pos, n, mask=keep)
    tl.store(frow + pos, full, mask=keep)
    rest = (n >= count) & (n < width)
    tl.store(row + n, tl.zeros_like(n), mask=rest)
    tl.store(frow + n, tl.zeros_like(full), mask=rest)
    for z in range(n.shape[0], width, n.shape[0]):  # a narrow row group's output can be wider than its rows
        tl.store(row + z + n, tl.zeros_like(n), mask=z + n < width)
        tl.store(frow + z + n, tl.zeros_like(full), mask=z + n < width)
    return count


@triton.jit
def _geometry(m, n, nkb, sink, local, block_q, block_k, q_len, off, CAUSAL: tl.constexpr):
    """Blocks n of query blocks m (a row index and [W], or [R, 1] and [1, W]): (causally allowed, forced sink and
    diagonal blocks, full: inside both lengths and wholly below the diagonal — ``layout.full_block_mask``'s rule)."""
    last_q = tl.minimum((m + 1) * block_q - 1, q_len - 1) + off
    full = ((m + 1) * block_q <= q_len) & ((n + 1) * block_k <= q_len + off)
    if CAUSAL:
        allowed = (n * block_k <= last_q) & (n < nkb)
        diag = last_q // block_k
        full = full & ((n + 1) * block_k - 1 <= m * block_q + off)
    else:
        allowed = n < nkb
        diag = m * block_q // block_k
    forced = ((n < sink) | ((n <= diag) & (n > diag - local))) & allowed
    return allowed, forced, full


@triton.jit
def _row(S, s_sb, s_sh, s_sm, H, nkb, sink, local, block_q, block_k, q_len, off, m, CAUSAL: tl.constexpr,
         W: tl.constexpr):
    """Row ``m`` of this program's head of pooled scores and its geometry: (block index, score, causally allowed,
    forced sink and diagonal blocks, full: inside both lengths and wholly below the diagonal — ``layout.
    full_block_mask``'s rule)."""
    bh = tl.program_id(0)
    n = tl.arange(0, W)
    score = tl.load(S + (bh // H) * s_sb + (bh % H) * s_sh + m * s_sm + n, mask=n < nkb,
                    other=float("-inf")).to(tl.float32)
    allowed, forced, full = _geometry(m, n, nkb, sink, local, block_q, block_k, q_len, off, CAUSAL)
    return n, score, allowed, forced, full


@triton.jit
def _select(S, IDX, FULL, CNT, TOTAL, s_sb, s_sh, s_sm, H, NQB, nkb, width, sink, local, block_q, block_k, q_len,
            off, M0, FEW, CAUSAL: tl.constexpr, W: tl.constexpr):
    bh = tl.program_id(0)
    m = M0 + tl.program_id(1)
    n, score, allowed, forced, full = _row(S, s_sb, s_sh, s_sm, H, nkb, sink, local, block_q, block_k, q_len, off,
                                           m, CAUSAL, W)
    score = tl.where(forced, float("inf"), tl.where(allowed, score, float("-inf")))
    key = _order_key(score)
    total = tl.load(TOTAL + m)
    picks = total - tl.sum(forced.to(tl.int32), 0)  # the total covers every forced block (``row_totals``)
    if picks <= FEW:
        keep = _top_few(key, n, forced, picks, W) & (total > 0)
    else:
        keep = _top(key, total)
    r = bh * NQB + m  # the row in the contiguous [B, H, NQ] outputs
    tl.store(CNT + r, _emit(keep, full, n, IDX + r * width, FULL + r * width, width))


def select_blocks(scores: torch.Tensor, total: torch.Tensor, width: int, sink: int, local: int, block_q: int,
                  block_k: int, q_len: int, k_len: int, causal: bool):
    """Per row the ``total[m]`` best blocks of ``scores`` [B, H, NQ, NK] (forced sink and diagonal blocks first,
    nothing past the causal diagonal) -> (index int32 [B, H, NQ, width] ascending then zeros, count int32
    [B, H, NQ], full bool [B, H, NQ, width]: the layout's ``kv_full``)."""
    b, h, nqb, nkb = scores.shape
    scores = scores.contiguous()
    out, full, count = _outputs(b, h, nqb, width, scores.device)
    total = total.to(torch.int32).contiguous()
    few = env_int("VIDSPARSE_SELECT_FEW", FEW, minimum=0)
    for m0, rows, w in _row_groups(nqb, nkb, block_q, block_k, q_len, k_len, causal):
        _select[(b * h, rows)](
            scores, out, full, count, total, scores.stride(0), scores.stride(1), scores.stride(2), h, nqb, nkb,
            width, sink, local, block_q, block_k, q_len, k_len - q_len, m0, few, CAUSAL=causal, W=w,
            num_warps=_warps(w),
        )
    return out, count, full


def _outputs(b: int, h: int, nqb: int, width: int, device):
    """A layout's contiguous (index int32, full bool [B, H, NQ, width]; count int32 [B, H, NQ]), every entry
    written by the kernel."""
    return (torch.empty(b, h, nqb, width, dtype=torch.int32, device=device),
            torch.empty(b, h, nqb, width, dtype=torch.bool, device=device),
            torch.empty(b, h, nqb, dtype=torch.int32, device=device))


@triton.jit
def _more_forced(EXTRA, FIRST, G, H, bh, m, n, NQB, nkb):
    """Blocks a caller forces besides the sink and diagonal (``select_mass``'s ``extra`` and ``first``): row m's
    entries of the bool [NQ, NK] mask, and the key block FIRST[b, h // G]."""
    extra = tl.load(EXTRA + m * nkb + n, mask=(n < nkb) & (m < NQB), other=0) != 0
    first = tl.load(FIRST + (bh // H) * (H // G) + (bh % H) // G)
    return (extra | (n == first)) & (n < nkb)


@triton.jit
def _select_mass(P, IDX, FULL, CNT, s_pb, s_ph, s_pm, H, NQB, nkb, tau, sink, local, block_q, block_k, q_len, off,
                 EXTRA, FIRST, G, CAUSAL: tl.constexpr, W: tl.constexpr, MORE: tl.constexpr):
    bh = tl.program_id(0)
    m = tl.program_id(1)  # every row at full width: the row's total mass counts entries past the diagonal too
    n, p, allowed, forced, full = _row(P, s_pb, s_ph, s_pm, H, nkb, sink, local, block_q, block_k, q_len, off, m,
                                       CAUSAL, W)
    if MORE:
        forced = forced | _more_forced(EXTRA, FIRST, G, H, bh, m, n, NQB, nkb)
    p = tl.where(n < nkb, p, 0.0)
    total = tl.maximum(tl.sum(p, 0), 1e-30)
    key = _order_key(p)
    target = tau * total  # compared as sums against a product, exactly as the torch path does (no division)
    t = _search(key, p, target, 0, 31)  # masses are >= 0: their keys too (0: every entry)
    # every entry above t is kept; of those equal to t, in index order, each whose preceding mass is below tau
    tie = key == t
    before = tl.sum(tl.where(key > t, p, 0.0), 0) + tl.cumsum(tl.where(tie, p, 0.0), 0) - p
    keep = ((key > t) | (tie & (before < target)) | (tau >= 1)) & (p > 0) & allowed
    r = bh * NQB + m
    tl.store(CNT + r, _emit(keep | forced, full, n, IDX + r * nkb, FULL + r * nkb, nkb))


def select_mass(probs: torch.Tensor, tau: float, sink: int, local: int, block_q: int, block_k: int, q_len: int,
                k_len: int, causal: bool, extra: torch.Tensor | None = None, first: torch.Tensor | None = None):
    """``patterns.base.keep_top_mass`` and ``finish_layout`` in one pass: per row of ``probs`` [B, H, NQ, NK]
    (non-negative masses), the fewest blocks, largest first and ties to the lower index, whose mass reaches ``tau``
    of the row's (every positive one at ``tau`` ≥ 1), plus the forced sink and diagonal blocks, nothing past the
    causal diagonal -> (index int32 [B, H, NQ, NK] ascending then zeros, count int32 [B, H, NQ], full bool
    [B, H, NQ, NK]). ``extra`` (bool [NQ, NK]) and ``first`` (integer [B, Hkv], Hkv dividing H: query head h reads
    first[b, h // (H / Hkv)]), given together: more forced blocks, row m's ``extra`` ones and the key block ``first``
    (``pbs``: the segments holding the row's own positions and the block where token 0 was permuted to)."""
    b, h, nqb, nkb = probs.shape
    probs = probs.float().contiguous()
    index, full, count = _outputs(b, h, nqb, nkb, probs.device)
    w = triton.next_power_of_2(max(nkb, 2))
    r = _rows_per(w)
    more = extra is not None
    if more:
        if first is None or tuple(extra.shape) != (nqb, nkb) or first.shape[0] != b or h % first.shape[1]:
            raise ValueError(f"select_mass: extra {tuple(extra.shape)} and first "
                             f"{None if first is None else tuple(first.shape)} for probs {tuple(probs.shape)}")
        extra, first, g = extra.to(torch.int8).contiguous(), first.to(torch.int32).contiguous(), h // first.shape[1]
    else:
        extra, first, g = probs, probs, 1  # unread
    args = (probs, index, full, count, probs.stride(0), probs.stride(1), probs.stride(2), h, nqb, nkb, float(tau), sink,
            local, block_q, block_k, q_len, k_len - q_len, extra, first, g)
    if r > 1:
        _select_mass_rows[(b * h, triton.cdiv(nqb, r))](*args, CAUSAL=causal, W=w, MORE=more, R=r,
                                                        num_warps=_warps(w))
    else:
        _select_mass[(b * h, nqb)](*args, CAUSAL=causal, W=w, MORE=more, num_warps=_warps(w))
    return index, count, full


@triton.jit
def _level_rules(lvl, allowed, forced, m, n, block_q, block_k, k_len, off, CAUSAL: tl.constexpr):
    """Ranked levels after the rules: nothing past the causal diagonal; the forced blocks, and any block not all of
    whose keys exist or not every query of the row block sees, exact (pooling those would leak or invent keys)."""
    lvl = tl.where(allowed, lvl, 0)
    poolable = (n + 1) * block_k <= k_len
    if CAUSAL:
        poolable = poolable & ((n + 1) * block_k - 1 <= m * block_q + off)
    return tl.where(((lvl > 1) & (~poolable)) | forced, 1, lvl)


@triton.jit
def _levels(S, RANKS, I1, I2, I4, I8, F1, F2, F4, F8, CNT, s_sb, s_sh, s_sm, H, NQB, nkb, w1, w2, w4, w8, sink,
            local, block_q, block_k, q_len, k_len, M0, CAUSAL: tl.constexpr, W: tl.constexpr):
    bh = tl.program_id(0)
    m = M0 + tl.program_id(1)
    off = k_len - q_len
    n, score, allowed, forced, full = _row(S, s_sb, s_sh, s_sm, H, nkb, sink, local, block_q, block_k, q_len, off,
                                           m, CAUSAL, W)
    score = tl.where(allowed, score, float("-inf"))
    key = _order_key(score)
    # the rank bounds of the four levels, nested: top r1 exact, top r2 at least 2x-pooled, ...
    lvl = tl.where(_top(key, tl.load(RANKS + m * 4 + 3)), 8, 0)
    lvl = tl.where(_top(key, tl.load(RANKS + m * 4 + 2)), 4, lvl)
    lvl = tl.where(_top(key, tl.load(RANKS + m * 4 + 1)), 2, lvl)
    lvl = tl.where(_top(key, tl.load(RANKS + m * 4)), 1, lvl)
    lvl = _level_rules(lvl, allowed, forced, m, n, block_q, block_k, k_len, off, CAUSAL)
    r = bh * NQB + m  # the row in the [B, H, NQ] outputs
    plane = tl.num_programs(0) * NQB
    tl.store(CNT + r, _emit(lvl == 1, full, n, I1 + r * w1, F1 + r * w1, w1))
    tl.store(CNT + plane + r, _emit(lvl == 2, full, n, I2 + r * w2, F2 + r * w2, w2))
    tl.store(CNT + 2 * plane + r, _emit(lvl == 4, full, n, I4 + r * w4, F4 + r * w4, w4))
    tl.store(CNT + 3 * plane + r, _emit(lvl == 8, full, n, I8 + r * w8, F8 + r * w8, w8))


def select_levels(scores: torch.Tensor, ranks: torch.Tensor, widths: tuple[int, int, int, int], sink: int,
                  local: int, block_q: int, block_k: int, q_len: int, k_len: int, causal: bool):
    """Pyramid levels in one pass: per row of ``scores`` [B, H, NQ, NK] (pooled block scores), the blocks ranked
    (by score, ties to the lower index) below ``ranks[m, 0]`` exact, below ``ranks[m, 1]`` 2×-pooled, ``[m, 2]``
    4×, ``[m, 3]`` 8× (``ranks`` int32 [NQ, 4], nested), nothing past the causal diagonal; forced sink/diagonal
    blocks and blocks that cannot be pooled (cut by the diagonal or the sequence end) exact. -> four (index int32
    [B, H, NQ, width], count int32 [B, H, NQ], full bool [B, H, NQ, width]) triples, levels 1, 2, 4, 8, indices
    ascending; ``widths`` must bound each level's count."""
    b, h, nqb, nkb = scores.shape
    scores = scores.contiguous()
    widths = [max(1, min(int(x), nkb)) for x in widths]
    outs = [torch.empty(b, h, nqb, x, dtype=torch.int32, device=scores.device) for x in widths]
    fulls = [torch.empty(b, h, nqb, x, dtype=torch.bool, device=scores.device) for x in widths]
    cnt = torch.empty(4, b, h, nqb, dtype=torch.int32, device=scores.device)
    ranks = ranks.to(torch.int32).contiguous()
    for m0, rows, w in _row_groups(nqb, nkb, block_q, block_k, q_len, k_len, causal):
        args = (scores, ranks, *outs, *fulls, cnt, scores.stride(0), scores.stride(1), scores.stride(2), h, nqb, nkb,
                *widths, sink, local, block_q, block_k, q_len, k_len, m0)
        full_w = triton.next_power_of_2(max(nkb, 2))  # the layout's width: one launch when it shares rows
        r = _rows_per(full_w) if w == full_w else 1  # (``_emit_rows`` writes at most W entries a row)
        if r > 1:
            _levels_rows[(b * h, triton.cdiv(rows, r))](*args, m0 + rows, CAUSAL=causal, W=w, R=r,
                                                         num_warps=_warps(w))
        else:
            _levels[(b * h, rows)](*args, CAUSAL=causal, W=w, num_warps=_warps(w))
    return [(x, cnt[i], f) for i, (x, f) in enumerate(zip(outs, fulls))]


# --- several narrow rows per program -------------------------------------------------------------------------------
# At 16K tokens (128 key blocks) a row is 128 entries: one program per row spends each search step's reduction on
# two warps' worth of work, 3,584 programs in all at 28 heads. These kernels give each program R rows as an [R, W]
# tile (``_rows_per``): every step reduces all R rows at once. The helpers are the ones above along the last axis,
# with per-row values [R, 1].


def _rows_per(w: int) -> int:
    """Rows per program of ``select_mass`` and ``select_levels`` for a layout of padded width ``w`` (its rows' key
    blocks): ``VIDSPARSE_SELECT_ROWS`` (default ``ROW_ENTRIES``) entries over ``w`` up to ``SHARED_UP_TO`` blocks,
    else one. Wider layouts keep one row per program in every launch, also in ``select_levels``' narrower causal
    launches (at 32K tokens, rows of 64 and 128 blocks shared 16 and 8 per program made ``pyramid`` slower)."""
    if w > SHARED_UP_TO:
        return 1
    return triton.next_power_of_2(max(1, env_int("VIDSPARSE_SELECT_ROWS", ROW_ENTRIES) // w))


@triton.jit
def _search_rows(key, weight, target, LO: tl.constexpr, STEPS: tl.constexpr):
    """``_search`` for each row of ``key`` [R, W] (``target`` [R, 1]) -> int32 [R, 1]."""
    lo = tl.zeros_like(target).to(tl.int64) + LO
    hi = tl.zeros_like(target).to(tl.int64) + 2147483647
    for _ in range(STEPS):
        mid = (lo + hi + 1) >> 1
        ge = tl.sum(tl.where(key >= mid.to(tl.int32), weight, 0), 1, keep_dims=True) >= target
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _top_rows(key, total):
    """``_top`` for each row of ``key`` [R, W] (``total`` [R, 1])."""
    t = _search_rows(key, 1, total, -2147483648, 32)
    above = key > t
    tie = key == t
    room = total - tl.sum(above.to(tl.int32), 1, keep_dims=True)
    return (above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= room))) & (total > 0)


@triton.jit
def _top_few_rows(key, n, forced, picks, total, W: tl.constexpr):
    """``_top_few`` for each row of ``key`` [R, W] (``picks``, ``total`` [R, 1]): as many rounds as the most picks
    of any row, each an int32 max of the keys not yet kept and a min of the indices holding it (ties to the lower
    index), instead of one int64 max of both packed (measured level in ``kernels/pooled_topk.py``)."""
    keep = forced
    for i in range(tl.max(picks)):
        cand = tl.where(keep, -2147483648, key)  # below every score's key (-inf's is -2139095041)
        best = tl.max(cand, 1, keep_dims=True)
        first = tl.min(tl.where(cand == best, n, W), 1, keep_dims=True)
        keep = keep | ((n == first) & (i < picks))
    return keep & (total > 0)


@triton.jit
def _emit_rows(keep, full, n, row, frow, width, ok):
    """``_emit`` for each row of ``keep`` [R, W] (``row``, ``frow``: [R, 1] output pointers; ``ok`` [R, 1]: the
    rows that exist) -> counts [R, 1]. The outputs are at most W wide: rows share programs only in full-width
    launches (``_rows_per``), so ``_emit``'s zero-fill past W is not needed (in ``pooled_topk`` its dead loop kept
    16–32 more bytes on the stack of the sm_90 build)."""
    pos = tl.cumsum(keep.to(tl.int32), 1) - 1
    count = tl.sum(keep.to(tl.int32), 1, keep_dims=True)
    tl.store(row + pos, n + tl.zeros_like(pos), mask=keep & ok)
    tl.store(frow + pos, full, mask=keep & ok)
    rest = (n >= count) & (n < width) & ok
    tl.store(row + n, tl.zeros_like(pos), mask=rest)
    tl.store(frow + n, tl.zeros_like(full), mask=rest)
    return count


@triton.jit
def _row_tile(S, s_sb, s_sh, s_sm, H, nkb, sink, local, block_q, block_k, q_len, off, M0, M_END, CAUSAL: tl.constexpr,
              W: tl.constexpr, R: tl.constexpr):
    """``_row`` for this program's R rows from M0 (those below M_END exist: ``ok`` [R, 1]) -> (rows m [R, 1], ok,
    block index n [1, W], and score, allowed, forced, full [R, W])."""
    bh = tl.program_id(0)
    m = M0 + tl.program_id(1) * R + tl.arange(0, R)[:, None]
    ok = m < M_END
    n = tl.arange(0, W)[None, :]
    score = tl.load(S + (bh // H) * s_sb + (bh % H) * s_sh + m * s_sm + n, mask=(n < nkb) & ok,
                    other=float("-inf")).to(tl.float32)
    allowed, forced, full = _geometry(m, n, nkb, sink, local, block_q, block_k, q_len, off, CAUSAL)
    return m, ok, n, score, allowed, forced, full


@triton.jit
def _select_mass_rows(P, IDX, FULL, CNT, s_pb, s_ph, s_pm, H, NQB, nkb, tau, sink, local, block_q, block_k, q_len,
                      off, EXTRA, FIRST, G, CAUSAL: tl.constexpr, W: tl.constexpr, MORE: tl.constexpr,
                      R: tl.constexpr):
    bh = tl.program_id(0)
    m, ok, n, p, allowed, forced, full = _row_tile(P, s_pb, s_ph, s_pm, H, nkb, sink, local, block_q, block_k, q_len,
                                                   off, 0, NQB, CAUSAL, W, R)
    if MORE:
        forced = forced | (_more_forced(EXTRA, FIRST, G, H, bh, m, n, NQB, nkb) & ok)
    p = tl.where((n < nkb) & ok, p, 0.0)
    total = tl.maximum(tl.sum(p, 1, keep_dims=True), 1e-30)
    key = _order_key(p)
    target = tau * total  # as ``_select_mass``
    t = _search_rows(key, p, target, 0, 31)
    tie = key == t
    before = tl.sum(tl.where(key > t, p, 0.0), 1, keep_dims=True) + tl.cumsum(tl.where(tie, p, 0.0), 1) - p
    keep = ((key > t) | (tie & (before < target)) | (tau >= 1)) & (p > 0) & allowed
    r = bh * NQB + m
    tl.store(CNT + r, _emit_rows(keep | forced, full, n, IDX + r * nkb, FULL + r * nkb, nkb, ok), mask=ok)


@triton.jit
def _levels_rows(S, RANKS, I1, I2, I4, I8, F1, F2, F4, F8, CNT, s_sb, s_sh, s_sm, H, NQB, nkb, w1, w2, w4, w8, sink,
                 local, block_q, block_k, q_len, k_len, M0, M_END, CAUSAL: tl.constexpr, W: tl.constexpr,
                 R: tl.constexpr):
    bh = tl.program_id(0)
    off = k_len - q_len
    m, ok, n, score, allowed, forced, full = _row_tile(S, s_sb, s_sh, s_sm, H, nkb, sink, local, block_q, block_k,
                                                       q_len, off, M0, M_END, CAUSAL, W, R)
    key = _order_key(tl.where(allowed, score, float("-inf")))
    lvl = tl.where(_top_rows(key, tl.load(RANKS + m * 4 + 3, mask=ok, other=0)), 8, 0)  # as ``_levels``
    lvl = tl.where(_top_rows(key, tl.load(RANKS + m * 4 + 2, mask=ok, other=0)), 4, lvl)
    lvl = tl.where(_top_rows(key, tl.load(RANKS + m * 4 + 1, mask=ok, other=0)), 2, lvl)
    lvl = tl.where(_top_rows(key, tl.load(RANKS + m * 4, mask=ok, other=0)), 1, lvl)
    lvl = _level_rules(lvl, allowed, forced, m, n, block_q, block_k, k_len, off, CAUSAL)
    r = bh * NQB + m
    plane = tl.num_programs(0) * NQB
    tl.store(CNT + r, _emit_rows(lvl == 1, full, n, I1 + r * w1, F1 + r * w1, w1, ok), mask=ok)
    tl.store(CNT + plane + r, _emit_rows(lvl == 2, full, n, I2 + r * w2, F2 + r * w2, w2, ok), mask=ok)
    tl.store(CNT + 2 * plane + r, _emit_rows(lvl == 4, full, n, I4 + r * w4, F4 + r * w4, w4, ok), mask=ok)
    tl.store(CNT + 3 * plane + r, _emit_rows(lvl == 8, full, n, I8 + r * w8, F8 + r * w8, w8, ok), mask=ok)
