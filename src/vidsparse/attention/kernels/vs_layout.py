"""``vertical_slash``'s layout from its probe rows' column and diagonal sums, in two Triton kernels.

The torch path (``patterns.vertical_slash``) takes two radix top-k selections (the ``vertical`` heaviest key columns
and the ``slash`` heaviest diagonal offsets, each with its forced first entries), scatters them into masks, adds the
kept columns per key block with a scatter-add, takes a running count of the kept offsets, gathers it at each
(query block, key block)'s offset bounds, and turns the block mask into a layout (a causal mask, a cumulative sum and
two scatters): about twenty launches after the two probe-row passes. Here:

1. ``_lines``, one program per (batch, head, line family): a 32-step binary search on the order-preserving integer
   of each sum (forced entries rank as +inf) finds the k-th largest; the entries above it, the lowest-indexed ones
   equal to it up to k, and of those only the positive ones are kept (``keep_topk``'s set; where torch's top-k picks
   among tied sums arbitrarily, this takes the lowest indices). The vertical program writes, per key block, whether a
   kept column falls in it; the slash program the running count of kept offsets (entry o: how many offsets below o
   are kept).
2. ``_rows``, one program per (batch, head, query block): a block is kept when a kept column falls in it or the
   running count differs between the offsets that bound the block (the torch path's ``_block_geometry``), inside the
   causal triangle; the kept block indices are written ascending with their ``kv_full`` flags, as
   ``BlockLayout.from_block_mask`` writes them (``block_select._emit``).

Rows up to ``RESIDENT`` entries stay in registers across the search (8 warps at 16K, 16 at 32K); longer rows are
read in chunks of ``CHUNK`` entries at each step (from L2).

Measured on an H200, 28/4 heads, video q/k (``benchmarks/profile_estimation.py --video --specs vertical_slash
--env-ab VIDSPARSE_VS_LAYOUT=0,1``, GPU ms of the whole estimate, mean of two interleaved runs in one process,
``profile_estimation_s109_vs_*.json``): 0.422 → 0.214 ms at 16K tokens, 0.678 → 0.458 at 32K (0.413 with the row in
registers, the default since: ``profile_estimation_s109_vsres_32768.json``), 1.298 → 0.905 at 64K, 3.128 → 1.869
at 128K. At 32K the resident row on 16 warps spills (its sm_90 build, as ``tests/test_hopper_compile.py``'s
``VS_LAYOUT_BUILD`` makes it with n = 32768, reports stack use at 128 registers) and is still faster than
the chunked row (0.413 against 0.458 ms); 16K on 8 warps builds without spills. A first version with one program
per head for both families and every row read in chunks (``profile_estimation_s108_vs_*.json``): 0.424 → 0.318 ms at
16K, 0.682 → 0.614 at 32K, 1.306 → 1.438 at 64K (slower than torch), 3.137 → 2.937 at 128K; its ``_lines`` took
0.141 of the 0.318 ms at 16K, this one's 0.033 (``profile_estimation_s10{8,9}_prof16.log``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_select import _emit, _geometry, _order_key, _top
from .fit import env_int

CHUNK = 4096  # entries per chunk of a longer row (``VIDSPARSE_VS_CHUNK``)
RESIDENT = 32768  # rows up to this many entries stay in registers (``VIDSPARSE_VS_RESIDENT``)
WARPS = 8  # warps per line program of a longer row; a resident row takes W / 2048 (at least 4)


@triton.jit
def _key(ROW, n, N, force):
    """The order keys of entries ``n``: +inf's for the forced first ``force``, -2^31 past N (never counted)."""
    v = tl.load(ROW + n, mask=n < N, other=0.0)
    key = tl.where(n < force, 0x7F800000, _order_key(v))
    return tl.where(n < N, key, -2147483648)


@triton.jit
def _kth(ROW, N, kk, force, CH: tl.constexpr):
    """The ``kk``-th largest key of the row (``kk`` ≥ 1), by a 32-step binary search counting keys ≥ each midpoint,
    the row read in chunks at every step."""
    ar = tl.arange(0, CH)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        acc = tl.zeros([CH], tl.int32)
        for c in range(0, N, CH):
            acc += (_key(ROW, c + ar, N, force) >= mid.to(tl.int32)).to(tl.int32)
        ge = tl.sum(acc, 0) >= kk
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _write(keep, c, ar, bh, fam, VB, CS, N, NKB, kept, BK: tl.constexpr, CH: tl.constexpr):
    """Entries c + ar's decisions: verticals (``fam`` 0) as whether a kept column falls in each key block, slashes as
    the running count of kept offsets from ``kept`` on (CS[o] = kept offsets below o); returns the new count."""
    if fam == 0:
        blocks = tl.arange(0, CH // BK)
        hit = tl.max(tl.reshape(keep.to(tl.int32), [CH // BK, BK]), 1)
        tl.store(VB + bh * NKB + c // BK + blocks, hit.to(tl.int8), mask=c // BK + blocks < NKB)
    else:
        tl.store(CS + bh * (N + 1) + 1 + c + ar, kept + tl.cumsum(keep.to(tl.int32), 0), mask=c + ar < N)
    return kept + tl.sum(keep.to(tl.int32), 0)


@triton.jit
def _lines(V, S, VB, CS, N, NKB, kv, ks, force_v, force_s, BK: tl.constexpr, CH: tl.constexpr,
           RESIDENT: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    fam = tl.program_id(1)  # 0: the verticals (columns), 1: the slashes (diagonal offsets)
    kk = tl.where(fam == 0, kv, ks)  # (selects: a launch argument of 1 is a constant, an if would mistype it)
    force = tl.where(fam == 0, force_v, force_s)
    if fam == 0:
        row = V + bh * N
    else:
        row = S + bh * N
        tl.store(CS + bh * (N + 1), 0)
    ar = tl.arange(0, CH)
    kept = tl.full([], 0, tl.int32)
    if RESIDENT:  # the whole row in registers across the search (``block_select._top``: ties to the lower index)
        key = _key(row, ar, N, force)
        kept = _write(_top(key, kk) & (key > 0), 0, ar, bh, fam, VB, CS, N, NKB, kept, BK, CH)
    else:
        t = _kth(row, N, tl.maximum(kk, 1), force, CH)
        above = tl.zeros([CH], tl.int32)
        for c in range(0, N, CH):
            above += (_key(row, c + ar, N, force) > t).to(tl.int32)
        room = kk - tl.sum(above, 0)
        ties = tl.full([], 0, tl.int32)
        for c in range(0, N, CH):
            key = _key(row, c + ar, N, force)
            tie = key == t
            keep = ((key > t) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= room))) & (key > 0) & (kk > 0)
            ties += tl.sum(tie.to(tl.int32), 0)
            kept = _write(keep, c, ar, bh, fam, VB, CS, N, NKB, kept, BK, CH)


@triton.jit
def _rows(VB, CS, IDX, FULL, CNT, N, NQB, NKB, block_q, block_k, q_len, off, CAUSAL: tl.constexpr,
          W: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    n = tl.arange(0, W)
    inside = n < NKB
    # the slash offsets that pass through block (m, n): [m·bq + off − (n+1)·bk + 1, (m+1)·bq − 1 + off − n·bk]
    lo = tl.minimum(tl.maximum(m * block_q + off - (n + 1) * block_k + 1, 0), N)
    hi = tl.minimum(tl.maximum((m + 1) * block_q + off - n * block_k, 0), N)
    cs = CS + bh * (N + 1)
    hits = tl.load(cs + hi, mask=inside, other=0) != tl.load(cs + lo, mask=inside, other=0)
    cols = tl.load(VB + bh * NKB + n, mask=inside, other=0) != 0
    allowed, _, full = _geometry(m, n, NKB, 0, 0, block_q, block_k, q_len, off, CAUSAL)
    r = bh * NQB + m
    tl.store(CNT + r, _emit((hits | cols) & allowed, full, n, IDX + r * NKB, FULL + r * NKB, NKB))


def supported(block_k: int) -> bool:
    """Whether the kernels take this key block: a power of two no longer than a chunk (a chunk then holds whole
    blocks)."""
    return block_k & (block_k - 1) == 0 and block_k <= CHUNK


def vertical_slash_layout(vert: torch.Tensor, slash: torch.Tensor, kv: int, ks: int, force_v: int, force_s: int,
                          block_q: int, block_k: int, q_len: int, k_len: int, causal: bool):
    """vert, slash float32 [B, H, Nk] (the probe rows' column and diagonal sums, Nk = ``k_len``) -> (index int32
    [B, H, NQ, NK] ascending then zeros, count int32 [B, H, NQ], full bool [B, H, NQ, NK]): the blocks the ``kv``
    heaviest columns and the ``ks`` heaviest offsets pass through (the first ``force_v`` / ``force_s`` always
    among them; only positive sums kept), inside the causal triangle — ``vertical_slash``'s torch path's layout."""
    b, h, nk = vert.shape
    if nk != k_len or slash.shape != vert.shape:
        raise ValueError(f"vertical_slash_layout: sums {tuple(vert.shape)} / {tuple(slash.shape)} for {k_len} keys")
    vert, slash = vert.float().contiguous(), slash.float().contiguous()
    nqb, nkb = -(-q_len // block_q), -(-k_len // block_k)
    resident = nk <= env_int("VIDSPARSE_VS_RESIDENT", RESIDENT, minimum=0)
    if resident:
        ch = max(triton.next_power_of_2(nk), block_k, 16)
        warps = min(32, max(4, ch // 2048))
    else:
        ch = max(triton.next_power_of_2(env_int("VIDSPARSE_VS_CHUNK", CHUNK)), block_k)
        ch, warps = min(ch, max(triton.next_power_of_2(nk), block_k)), WARPS
    cols = torch.empty(b, h, nkb, dtype=torch.int8, device=vert.device)
    runs = torch.empty(b, h, nk + 1, dtype=torch.int32, device=vert.device)
    _lines[(b * h, 2)](vert, slash, cols, runs, nk, nkb, min(kv, nk), min(ks, nk), force_v, force_s, BK=block_k,
                       CH=ch, RESIDENT=resident, num_warps=warps)
    index = torch.empty(b, h, nqb, nkb, dtype=torch.int32, device=vert.device)
    full = torch.empty(b, h, nqb, nkb, dtype=torch.bool, device=vert.device)
    count = torch.empty(b, h, nqb, dtype=torch.int32, device=vert.device)
    w = triton.next_power_of_2(max(nkb, 2))
    _rows[(b * h, nqb)](cols, runs, index, full, count, nk, nqb, nkb, block_q, block_k, q_len, k_len - q_len,
                        CAUSAL=causal, W=w, num_warps=2 if w <= 1024 else 4)
    return index, count, full
