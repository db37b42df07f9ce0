"""``token_sparse``'s selection in one Triton kernel: per (batch, head), drop the least-attended tokens whose mass
stays within a budget, and write the kept positions in ascending order.

The torch path (``patterns.token_sparse.drop_light_reference``) sorts every head's N token scores, takes a cumulative
sum, scatters the decision back, and compacts the kept positions with a second cumulative sum and a scatter: about
0.33 ms of the 0.61 ms estimate at 32K tokens and 28 heads on an H200, more than the two probe-row passes that
produce the scores. Here one program per row:

1. sums the row's scores (the budget is ``frac`` of that total) and zeroes the weights of the tokens that may not be
   dropped (the first ``sink``, those from ``window_start`` on, those outside the visual span [vis_s, vis_e));
2. finds, by a 31-step binary search on the weights' bits (non-negative floats order as their bit patterns), the
   largest ``t`` such that the weights below ``t`` sum to at most the budget (each step one masked sum over the row);
3. drops every droppable token below ``t`` and, of those equal to ``t`` in index order, each whose running mass
   stays within the budget: exactly the stable ascending sort's prefix whose cumulative sum is ≤ the budget;
4. writes the kept positions ascending through a running prefix sum, then -1 up to N, and the count.

Rows up to ``RESIDENT`` entries stay in registers across the search (32K entries on 16 warps, built without spills:
``tests/test_hopper_compile.py``; a 64K row on 32 warps was slower than the scratch row, 0.738 against 0.641 ms for
the whole estimate, ``profile_estimation_tsel2_resident_65536.json``). A longer row's weights are written once to a
scratch row and read in chunks at each step, from L2. The writing pass reads every row in chunks (its scatter
addresses are 64-bit).

Measured on an H200 at 28/4 heads on video-structured q/k (``benchmarks/profile_estimation.py --env-ab``, in one
process, BENCHMARKS.md "…, video q/k, all patterns, token selection kernel"): the whole ``token_sparse`` estimate
0.61 → 0.34 ms at 32K tokens (this kernel 0.06 ms) and 1.98 → 1.21 ms at 128K. A first version that re-derived
each score's key and droppability at every step, with no scratch row, took 0.17 ms at 32K and 0.84 ms at 128K.

The sums run in another order than torch's cumulative sum, so a token whose running mass lands within rounding of
the budget may go the other way (the tests compare the two paths entry for entry on dyadic scores, whose sums are
exact)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fit import env_int

RESIDENT = 32768  # rows up to this many entries stay in registers (``VIDSPARSE_TOKSEL_RESIDENT``)
CHUNK = 4096  # entries per chunk of a longer row (``VIDSPARSE_TOKSEL_CHUNK``)
WARPS = 16  # warps per program of a longer row (``VIDSPARSE_TOKSEL_WARPS``); a resident row takes W / 2048, 4 to 32
# (``VIDSPARSE_TOKSEL_RESIDENT_WARPS``)


@triton.jit
def _weights(row, n, N, sink, win, vis_s, vis_e):
    """Scores of entries ``n`` (0 past N) and their weights in the search: the score where the entry may be dropped,
    else 0 (+0.0, so that the weights' bits order as their values)."""
    v = tl.load(row + n, mask=n < N, other=0.0)
    return v, tl.where(_droppable(n, N, sink, win, vis_s, vis_e), v, 0.0) + 0.0


@triton.jit
def _droppable(n, N, sink, win, vis_s, vis_e):
    return (n >= sink) & (n < win) & (n >= vis_s) & (n < vis_e) & (n < N)


@triton.jit
def _below(w, t):
    """Per entry, the weight if its bits are below ``t`` (else 0)."""
    return tl.where(w.to(tl.int32, bitcast=True) < t, w, 0.0)


@triton.jit
def _drop_light(S, WS, IDX, CNT, s_sb, s_sh, H, N, frac, sink, win, vis_s, vis_e, RESIDENT: tl.constexpr,
                CH: tl.constexpr, EC: tl.constexpr):
    bh = tl.program_id(0)
    row = S + (bh // H).to(tl.int64) * s_sb + (bh % H).to(tl.int64) * s_sh
    ws = WS + bh.to(tl.int64) * N  # a longer row's weights, written once and read at each step
    out = IDX + bh.to(tl.int64) * N
    ar = tl.arange(0, CH)
    lo = tl.full([], 0, tl.int32)  # the bits of +0.0 ...
    hi = tl.full([], 0x7F800000, tl.int32)  # ... and of +inf, above every finite weight: hi − lo + 1 fits in int32
    if RESIDENT:  # the whole row in registers, read once
        budget = frac * tl.sum(_weights(row, ar, N, sink, win, vis_s, vis_e)[0], 0)
        w = _weights(row, ar, N, sink, win, vis_s, vis_e)[1]  # read again: the scores need not stay live
        for _ in range(31):
            mid = lo + ((hi - lo + 1) >> 1)
            ok = tl.sum(_below(w, mid), 0) <= budget
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    else:
        acc = tl.zeros([CH], tl.float32)
        for c in range(0, N, CH):
            v, w = _weights(row, c + ar, N, sink, win, vis_s, vis_e)
            acc += v
            tl.store(ws + c + ar, w, mask=c + ar < N)
        budget = frac * tl.sum(acc, 0)
        tl.debug_barrier()  # the weights visible to every thread of the program
        for _ in range(31):
            mid = lo + ((hi - lo + 1) >> 1)
            acc = tl.zeros([CH], tl.float32)
            for c in range(0, N, CH):
                acc += _below(tl.load(ws + c + ar, mask=c + ar < N, other=0.0), mid)
            ok = tl.sum(acc, 0) <= budget
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    t = lo
    # the mass below t, then the ties at t in index order while the running mass stays within the budget
    if RESIDENT:
        below = tl.sum(_below(w, t), 0)
    else:
        acc = tl.zeros([CH], tl.float32)
        for c in range(0, N, CH):
            acc += _below(tl.load(ws + c + ar, mask=c + ar < N, other=0.0), t)
        below = tl.sum(acc, 0)
    count = tl.full([], 0, tl.int32)
    ec = tl.arange(0, EC)  # the writing pass reads the row again in chunks of EC (the scatter's addresses are 64-bit)
    for c in range(0, N, EC):
        n = c + ec
        if RESIDENT:
            wc = _weights(row, n, N, sink, win, vis_s, vis_e)[1]
        else:
            wc = tl.load(ws + n, mask=n < N, other=0.0)
        key = wc.to(tl.int32, bitcast=True)
        cand = _droppable(n, N, sink, win, vis_s, vis_e)
        tie = tl.where(cand & (key == t), wc, 0.0)
        drop = cand & ((key < t) | ((key == t) & (below + tl.cumsum(tie, 0) <= budget)))
        below += tl.sum(tie, 0)
        keep = ~drop & (n < N)
        tl.store(out + count + tl.cumsum(keep.to(tl.int32), 0) - 1, n.to(tl.int64), mask=keep)
        count += tl.sum(keep.to(tl.int32), 0)
    for c in range(count - count % EC, N, EC):
        n = c + ec
        tl.store(out + n, tl.full([EC], -1, tl.int64), mask=(n >= count) & (n < N))
    tl.store(CNT + bh, count.to(tl.int64))


def drop_light(scores: torch.Tensor, frac: float, sink: int, window_start: int,
               visual: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores float32 [B, H, N] (non-negative) -> (index int64 [B, H, N]: each row's kept positions ascending, then
    -1; count int64 [B, H]). Dropped: the droppable entries (position ≥ ``sink``, < ``window_start`` and inside
    ``visual`` [s, e) when given) of a stable ascending sort's longest prefix whose cumulative sum is at most ``frac``
    of the row's total."""
    b, h, n = scores.shape
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    index = torch.empty(b, h, n, dtype=torch.long, device=scores.device)
    count = torch.empty(b, h, dtype=torch.long, device=scores.device)
    if b * h == 0 or n == 0:
        return index, count.zero_()
    resident = n <= env_int("VIDSPARSE_TOKSEL_RESIDENT", RESIDENT, minimum=0)
    chunk = triton.next_power_of_2(env_int("VIDSPARSE_TOKSEL_CHUNK", CHUNK))
    if resident:
        ch = triton.next_power_of_2(max(n, 16))
        warps = env_int("VIDSPARSE_TOKSEL_RESIDENT_WARPS", 0, minimum=0, pow2=True) or min(32, max(4, ch // 2048))
        weights = scores  # (no scratch: a placeholder pointer)
    else:
        ch, warps = chunk, env_int("VIDSPARSE_TOKSEL_WARPS", WARPS, pow2=True)
        weights = torch.empty(b * h, n, dtype=torch.float32, device=scores.device)
    vs, ve = visual if visual is not None else (0, n)
    _drop_light[(b * h,)](scores, weights, index, count, scores.stride(0), scores.stride(1), h, n, float(frac), sink,
                          window_start, vs, ve, RESIDENT=resident, CH=ch, EC=min(ch, chunk), num_warps=warps)
    return index, count
