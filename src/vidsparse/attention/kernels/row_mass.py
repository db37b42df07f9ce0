"""Column and diagonal sums of a few query rows' exact causal softmax over all keys, in two Triton passes.

What the probe-row estimates read (``vertical_slash``'s verticals and slashes, ``pbs``'s permutation, ``token_sparse``,
SnapKV, ZipVL, FastV): Σ over R rows of softmax(scale · q_r·Kᵀ), keys after a row's position excluded, per key
(the column sums) and, for rows at consecutive positions, per diagonal offset o = position − key (the diagonal sums).
The torch path (``patterns.base.row_probs``) builds the [B, H, R, Nk] fp32 probability matrix: a GEMM, a masked fill,
a softmax, a sum over rows, and for the diagonals a flip, a pad, a copy and a skewed sum — about ten passes over a
matrix of 235 MB at 32K keys, 28 heads and 64 rows. Here it never reaches memory:

1. ``_row_stats``: per (head, row chunk, key chunk), the running max and sum of exp of the rows' scores over the
   chunk's key tiles (online softmax), written per chunk (at most ``MAX_CHUNKS``).
2. ``_row_mass``: per (head, row chunk, key chunk), merges the chunks' statistics into each row's max and sum once,
   then for each of its key tiles recomputes the scores, normalises them and sums them over rows (the columns). For
   the diagonals, the tile's probabilities are skewed in registers (``tl.gather``: entry (r, u) takes column
   r − u + BN − 1, so each diagonal becomes a column) and summed over rows; a tile's BN + BR − 1 diagonals overlap the
   next tile's in BR − 1, added with atomics (at most two additions per offset and row chunk).

Columns alone (``token_sparse``, ``pbs``, SnapKV, ZipVL) take ``_col_mass`` for the second pass: the tile transposed,
K·qᵀ [keys, rows], so that a key's sum over the rows is a reduction within a thread and its quad instead of across
warps, and the keys load in their own layout. Against ``_row_mass`` (``--env-ab VIDSPARSE_COL_MASS=rows,keys``, GPU ms
of the whole estimate on an H200, ``profile_estimation_s128_ab_*.json``): token_sparse 0.181 → 0.151 ms at 16K
(video q/k, 28/28), 0.173 → 0.143 (28/4), 0.307 → 0.257 at 32K, 1.216 → 1.008 at 128K; pbs 0.323 → 0.294, 0.251 →
0.222, 0.440 → 0.390, 1.99 → 1.78. Its tile: 64 keys on 4 warps (32 / 128 keys: 0.167 / 0.168 ms at 16K, 1.106 /
1.120 at 128K, against 0.151 and 1.007; 8 warps: the same); 64 probe rows a program (128: 0.143 against 0.137 ms at
16K 28/4, 0.257 / 0.253 at 32K, 1.007 / 0.986 at 128K; ``s128_*``, ``s129_*``). ``VIDSPARSE_COL_MASS=rows`` takes
``_row_mass`` instead; ``VIDSPARSE_COL_MASS_BN``, ``_ROWS``, ``_WARPS``, ``_STAGES`` set the tile and its pipeline.
The statistics pass's own knobs (``VIDSPARSE_ROW_STATS_BN``, ``_WARPS``, ``_STAGES``) measured its defaults best
(``profile_estimation_s133_*``, GPU ms of the whole estimate, 16K video q/k 28/28): key tiles of 64 / 128 / 256
0.146 / 0.146 / 0.164 ms for token_sparse, 0.067 / 0.065 / 0.168 for grid; 4 / 8 warps 0.146 / 0.157 and 0.065 /
0.075; 2 / 3 / 4 stages 0.163 / 0.146 / 0.164 and 0.068 / 0.065 / 0.076; the column pass at 2 / 3 / 4 stages 0.153 /
0.146 / 0.156 (alike at 32K on 28/4 for token_sparse and pbs).

Tiles that lie wholly before every probe row's position and within the keys (all but the last few at the end of a
sequence) run in their own loop, without the causal mask and with unmasked key loads; every exponent is one
multiply-add of the unscaled product (the statistics pass takes the max of the unscaled products, the scale being
positive), and the summing passes fold each row's 1 / exp-sum into it (exp2(s − max − log2 sum)). GPU ms of the whole
estimate on an H200 against the masked single loop (``--module-ab``, ``profile_estimation_s134_*``, video q/k at 16K,
random q/k beyond): token_sparse 0.252 → 0.231 at 32K (28/4), 0.960 → 0.860 at 128K, 0.137 → 0.133 at 16K (28/4) but
0.146 → 0.149 at 16K (28/28, where each pass reads 117 MB of keys); pbs 0.386 → 0.365 at 32K, 0.215 → 0.212 and
0.289 → 0.291 at 16K; grid 0.065 → 0.064. ``_row_mass`` with diagonals (vertical_slash) keeps the single masked loop:
a second copy of its body with the skew's gather spilled registers on sm_90.

``phase_mass`` (for ``grid``: each row's mass on the keys of its own phase modulo one or two candidate strides) is a
per-row quantity, so it needs only the first pass: beside each row's running max and exp-sum it keeps the exp-sums
over its phase's keys, rescaled alike; the key chunks' partial sums are merged in torch (``phase_share``: in one
Triton program per head, which also averages the rows and picks grid's stride). A key's phase is the tile start's
plus its offset's in the tile, less the stride once past it, not a division per key: grid's estimate 0.133 → 0.099 ms
at 32K (video q/k, 28/4, H200), 0.242 → 0.188 at 64K (28/28; ``--module-ab``, ``profile_estimation_s131_mod_*``).

Products are the inputs' (bf16/fp16 exact in the fp32 accumulator; fp32 inputs use IEEE fp32 products), as the
torch path's TF32 products of bf16 operands are. With one row chunk (R ≤ 64) every column sum is one store and every
diagonal sum at most two additions to zero (the same in either order), so the result does not depend on the order the
programs run in; with more row chunks the atomics' order may move the diagonal sums (past two chunks also the column
sums) in the last bit.

Measured on an H100, 28/4 heads, bf16 (``benchmarks/profile_estimation.py --with-kernel``, GPU time of the whole
estimate, ``profile_estimation_share_*.json``): ``vertical_slash`` at 32K / 64K / 128K tokens 1.73 / 3.54 / 7.83 ms
with the torch sums, 0.70 / 1.40 / 3.45 ms with this kernel (of which ``_row_mass`` 0.24 / 0.44 / 0.85 and
``_row_stats`` 0.06 / 0.10 / 0.19); ``pbs`` 2.20 / 4.65 / 10.51 → 1.05 / 2.19 / 5.49 ms. A first version with one
``_row_mass`` program per key tile reread every row's chunk statistics per tile: 0.28 ms at 32K
(``profile_estimation_share_*_pertile.json``). Tried and dropped (branch ``tried-2026-11-29-rowbr``): 128 probe rows
in one program of 8 warps instead of two of 64 on 4 (K read once per pass, plain column stores): slower on an H200
(``--env-ab VIDSPARSE_ROW_BR=64,0``, GPU ms of the whole estimate, ``profile_estimation_s125_br_*.json``):
token_sparse 0.183 → 0.201 ms at 16K 28/28, 0.176 → 0.201 at 16K 28/4, 0.311 → 0.342 at 32K, 1.215 → 1.322 at
128K; pbs 0.323 → 0.340, 0.250 → 0.275, 0.438 → 0.470, 1.983 → 2.092."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fit import env_choice, env_int, needs_int64

BR = 64  # rows per program
BN_STATS = 128  # key tile of the statistics pass
BN = 64  # key tile of the summing pass: the skew's gather is [BR, 2·BN] per tile
COL_BN = 64  # key tile of the transposed summing pass (columns only, ``_col_mass``)
COL_BR = 64  # probe rows per program of the transposed summing pass (128: K read once, but fewer programs; slower)
MAX_CHUNKS = 64  # key chunks per (head, row chunk) of both passes at most (each row merges this many max/sum pairs)
KEYS_PER_CHUNK = 1024  # keys per chunk at least: up to 64K keys, fewer chunks of more tiles (``_chunks``)
MERGE_ENTRIES = 4096  # (row, chunk) statistics ``_phase_share`` merges at once: the rows in blocks of this over chunks
LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(Q, QPOS, bh, rc, H, R, s_qb, s_qh, s_qr, s_qd, D: tl.constexpr, BD: tl.constexpr,
               BR: tl.constexpr, I64: tl.constexpr):
    """This program's query rows [BR, BD] (zeros past R and past D) and their positions (-1 past R)."""
    rows = rc * BR + tl.arange(0, BR)
    dd = tl.arange(0, BD)
    b = bh // H
    h = bh % H
    if I64:  # offsets past 2^31 (``fit.needs_int64``)
        b, h = b.to(tl.int64), h.to(tl.int64)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qr + dd[None, :] * s_qd,
                mask=(rows[:, None] < R) & (dd[None, :] < D), other=0.0)
    pos = tl.load(QPOS + rows, mask=rows < R, other=-1)
    return q, pos, rows


@triton.jit
def _scores(q, K, bh, H, G, n0, NK, s_kb, s_kh, s_kn, s_kd, pos, D: tl.constexpr, BD: tl.constexpr,
            BN: tl.constexpr, PRECISION: tl.constexpr, I64: tl.constexpr, MASKED: tl.constexpr):
    """The rows' products with keys n0..n0+BN, unscaled (the callers fold the scale into one multiply-add with the
    exponent's offset); with ``MASKED``, -inf where a key is past the row's position or past the keys — without it
    the tile lies wholly before every row's position and within the keys (``_full_tiles``). And the keys' indices."""
    n = n0 + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    b = bh // H
    hk = (bh % H) // G
    if I64:  # offsets past 2^31 (``fit.needs_int64``): 28 K/V heads of 600K keys, or a late key of a transposed k
        b, hk, n = b.to(tl.int64), hk.to(tl.int64), n.to(tl.int64)
    kp = K + b * s_kb + hk * s_kh + n[None, :] * s_kn + dd[:, None] * s_kd
    if MASKED:
        kt = tl.load(kp, mask=(n[None, :] < NK) & (dd[:, None] < D), other=0.0)
    elif BD == D:
        kt = tl.load(kp)
    else:
        kt = tl.load(kp, mask=dd[:, None] < D, other=0.0)
    s = tl.dot(q, kt, input_precision=PRECISION)
    if MASKED:
        s = tl.where((n[None, :] <= pos[:, None]) & (n[None, :] < NK), s, float("-inf"))
    return s, n


@triton.jit
def _full_tiles(pos, rows, R, NK, BN: tl.constexpr):
    """Key tiles 0 … (this) − 1 lie wholly at or before every row's position and within the keys: no mask."""
    return tl.minimum(tl.min(tl.where(rows < R, pos, NK), 0) + 1, NK) // BN


@triton.jit
def _stats_tile(q, K, bh, H, G, t, NK, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, m, l, ph1, ph2, j1, j2, p1, p2, C1, C2,
                D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, PHASES: tl.constexpr,
                I64: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the online softmax statistics (log2 domain): the running max ``m``, exp-sum ``l`` and with
    ``PHASES`` the exp-sums over each row's phase, rescaled alike. The scale is positive, so the max of the unscaled
    products scaled is the max of the scaled ones, and each exponent is one multiply-add."""
    s, n = _scores(q, K, bh, H, G, t * BN, NK, s_kb, s_kh, s_kn, s_kd, pos, D, BD, BN, PRECISION, I64, MASKED)
    m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_sub)
    e = tl.exp2(s * qk_scale - m_sub[:, None])
    l = l * alpha + tl.sum(e, 1)
    if PHASES >= 1:  # keys and rows at positions ≥ 0
        k1 = j1 + (t * BN) % C1
        k1 = tl.where(k1 >= C1, k1 - C1, k1)
        ph1 = ph1 * alpha + tl.sum(tl.where(k1[None, :] == p1[:, None], e, 0.0), 1)
    if PHASES >= 2:
        k2 = j2 + (t * BN) % C2
        k2 = tl.where(k2 >= C2, k2 - C2, k2)
        ph2 = ph2 * alpha + tl.sum(tl.where(k2[None, :] == p2[:, None], e, 0.0), 1)
    return m_new, l, ph1, ph2


@triton.jit
def _row_stats(Q, K, QPOS, ML, H, G, R, NK, TPC, NCH, C1, C2, s_qb, s_qh, s_qr, s_qd, s_kb, s_kh, s_kn, s_kd,
               qk_scale, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
               PRECISION: tl.constexpr, PHASES: tl.constexpr, I64: tl.constexpr):
    bh = tl.program_id(0)
    rc = tl.program_id(1)
    c = tl.program_id(2)
    q, pos, rows = _load_rows(Q, QPOS, bh, rc, H, R, s_qb, s_qh, s_qr, s_qd, D, BD, BR, I64)
    m = tl.full([BR], float("-inf"), tl.float32)
    l = tl.zeros([BR], tl.float32)
    ph1 = tl.zeros([BR], tl.float32)  # with PHASES: the exp-sums of the keys of each row's own phase, like l
    ph2 = tl.zeros([BR], tl.float32)
    # the phases without a division per key: a key's phase is its offset's in the tile (fixed) plus the tile's
    # start's, less the stride once past it; the rows' phases are fixed (a row past R sits at -1: no key matches)
    j1 = tl.arange(0, BN) % C1
    j2 = tl.arange(0, BN) % C2
    p1 = pos % C1
    p2 = pos % C2
    t_end = tl.minimum((c + 1) * TPC, tl.max(pos, 0) // BN + 1)  # no row sees a key past its position
    t_mid = tl.maximum(c * TPC, tl.minimum(t_end, _full_tiles(pos, rows, R, NK, BN)))
    for t in range(c * TPC, t_mid):  # tiles before every row's position: no mask
        m, l, ph1, ph2 = _stats_tile(q, K, bh, H, G, t, NK, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, m, l, ph1, ph2,
                                     j1, j2, p1, p2, C1, C2, D, BD, BN, PRECISION, PHASES, I64, False)
    for t in range(t_mid, t_end):
        m, l, ph1, ph2 = _stats_tile(q, K, bh, H, G, t, NK, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, m, l, ph1, ph2,
                                     j1, j2, p1, p2, C1, C2, D, BD, BN, PRECISION, PHASES, I64, True)
    off = (bh * R + rows) * NCH + c
    plane = R * NCH * tl.num_programs(0)
    tl.store(ML + off, m, mask=rows < R)
    tl.store(ML + plane + off, l, mask=rows < R)
    if PHASES >= 1:
        tl.store(ML + 2 * plane + off, ph1, mask=rows < R)
    if PHASES >= 2:
        tl.store(ML + 3 * plane + off, ph2, mask=rows < R)


@triton.jit
def _merged_offsets(ML, bh, R, NCH, rows, BCH: tl.constexpr):
    """Each row's log2 normaliser over all keys, max + log2(exp-sum), merged from the statistics pass's chunks
    (``_row_stats``'s ML planes 0 and 1): a probability is exp2(scaled score − this), one multiply-add and an exp2.
    +inf where no key reached the row (and past R), so that its probabilities are 0."""
    ch = tl.arange(0, BCH)
    off = (bh * R + rows[:, None]) * NCH + ch[None, :]
    ok = (rows[:, None] < R) & (ch[None, :] < NCH)
    mc = tl.load(ML + off, mask=ok, other=float("-inf"))
    lc = tl.load(ML + R * NCH * tl.num_programs(0) + off, mask=ok, other=0.0)
    m = tl.max(mc, 1)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(lc * tl.exp2(mc - m_sub[:, None]), 1)
    return tl.where(l > 0.0, m_sub + tl.log2(tl.where(l > 0.0, l, 1.0)), float("inf"))


@triton.jit
def _row_mass(Q, K, QPOS, ML, COLS, DIAG, H, G, R, NK, NCH, TPC, FIRST, s_qb, s_qh, s_qr, s_qd, s_kb, s_kh, s_kn,
              s_kd, qk_scale, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BCH: tl.constexpr,
              PRECISION: tl.constexpr, ATOMIC_COLS: tl.constexpr, DIAGONALS: tl.constexpr, I64: tl.constexpr):
    bh = tl.program_id(0)
    rc = tl.program_id(1)
    c = tl.program_id(2)
    q, pos, rows = _load_rows(Q, QPOS, bh, rc, H, R, s_qb, s_qh, s_qr, s_qd, D, BD, BR, I64)
    norm = _merged_offsets(ML, bh, R, NCH, rows, BCH)  # once per program
    t_end = tl.minimum((c + 1) * TPC, tl.max(pos, 0) // BN + 1)  # tiles past every row's position add nothing
    t_mid = c * TPC
    if not DIAGONALS:  # (with the diagonals' skew, a second loop body spills registers on sm_90)
        t_mid = tl.maximum(c * TPC, tl.minimum(t_end, _full_tiles(pos, rows, R, NK, BN)))
        for t in range(c * TPC, t_mid):  # tiles before every row's position: no mask
            _mass_tile(q, K, COLS, DIAG, bh, H, G, t, rc, NK, FIRST, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, norm, D,
                       BD, BR, BN, PRECISION, ATOMIC_COLS, DIAGONALS, I64, False)
    for t in range(t_mid, t_end):
        _mass_tile(q, K, COLS, DIAG, bh, H, G, t, rc, NK, FIRST, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, norm, D, BD,
                   BR, BN, PRECISION, ATOMIC_COLS, DIAGONALS, I64, True)


@triton.jit
def _mass_tile(q, K, COLS, DIAG, bh, H, G, t, rc, NK, FIRST, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, norm,
               D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
               ATOMIC_COLS: tl.constexpr, DIAGONALS: tl.constexpr, I64: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of ``_row_mass``: the rows' probabilities summed per column and (with ``DIAGONALS``) per
    diagonal."""
    s, n = _scores(q, K, bh, H, G, t * BN, NK, s_kb, s_kh, s_kn, s_kd, pos, D, BD, BN, PRECISION, I64, MASKED)
    p = tl.exp2(s * qk_scale - norm[:, None])  # 0 where masked (exp2(-inf)) and on rows past R (norm +inf)
    col = tl.sum(p, 0)
    if ATOMIC_COLS:
        tl.atomic_add(COLS + bh * NK + n, col, mask=n < NK, sem="relaxed")
    else:
        tl.store(COLS + bh * NK + n, col, mask=n < NK)
    if DIAGONALS:  # row r, key n0 + j lies on offset FIRST + rc·BR + r − n0 − j: local index u = r − j + BN − 1
        u = tl.arange(0, 2 * BN)
        j = tl.arange(0, BR)[:, None] - u[None, :] + (BN - 1)
        on = (j >= 0) & (j < BN)
        skew = tl.gather(p, tl.where(on, j, 0), 1)
        diag = tl.sum(tl.where(on, skew, 0.0), 0)
        o = FIRST + rc * BR - t * BN - (BN - 1) + u
        tl.atomic_add(DIAG + bh * NK + o, diag, mask=(o >= 0) & (o < NK) & (u < BN + BR - 1), sem="relaxed")


@triton.jit
def _col_mass(Q, K, QPOS, ML, COLS, H, G, R, NK, NCH, TPC, s_qb, s_qh, s_qr, s_qd, s_kb, s_kh, s_kn, s_kd, qk_scale,
              D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BCH: tl.constexpr,
              PRECISION: tl.constexpr, ATOMIC_COLS: tl.constexpr, I64: tl.constexpr):
    """``_row_mass`` without diagonals, transposed: each key tile's scores are K·qᵀ [BN keys, BR rows], so a key's
    sum over the rows is a reduction along the tile's rows (within a thread and its quad), not across warps, and the
    keys load in their own layout. ``BR`` probe rows a program (64 by default; 128 would read K once per head and key
    chunk, but with fewer programs it ran slower)."""
    bh = tl.program_id(0)
    rc = tl.program_id(1)
    c = tl.program_id(2)
    rows = rc * BR + tl.arange(0, BR)
    dd = tl.arange(0, BD)
    b = bh // H
    h = bh % H
    hk = h // G
    if I64:  # offsets past 2^31 (``fit.needs_int64``)
        b, h, hk = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    qt = tl.load(Q + b * s_qb + h * s_qh + rows[None, :] * s_qr + dd[:, None] * s_qd,
                 mask=(rows[None, :] < R) & (dd[:, None] < D), other=0.0)  # [BD, BR]
    pos = tl.load(QPOS + rows, mask=rows < R, other=-1)
    norm = _merged_offsets(ML, bh, R, NCH, rows, BCH)
    t_end = tl.minimum((c + 1) * TPC, tl.max(pos, 0) // BN + 1)
    t_mid = tl.maximum(c * TPC, tl.minimum(t_end, _full_tiles(pos, rows, R, NK, BN)))
    for t in range(c * TPC, t_mid):  # tiles before every row's position: no mask
        _col_tile(qt, K, COLS, b, hk, bh, t, NK, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, norm, D, BD, BN, PRECISION,
                  ATOMIC_COLS, I64, False)
    for t in range(t_mid, t_end):
        _col_tile(qt, K, COLS, b, hk, bh, t, NK, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, norm, D, BD, BN, PRECISION,
                  ATOMIC_COLS, I64, True)


@triton.jit
def _col_tile(qt, K, COLS, b, hk, bh, t, NK, s_kb, s_kh, s_kn, s_kd, qk_scale, pos, norm, D: tl.constexpr,
              BD: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_COLS: tl.constexpr,
              I64: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of ``_col_mass``: K·qᵀ [BN keys, BR rows], each key's probabilities summed over the rows."""
    n = t * BN + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    nn = n.to(tl.int64) if I64 else n
    kp = K + b * s_kb + hk * s_kh + nn[:, None] * s_kn + dd[None, :] * s_kd
    if MASKED:
        kb = tl.load(kp, mask=(n[:, None] < NK) & (dd[None, :] < D), other=0.0)  # [BN, BD]
    elif BD == D:
        kb = tl.load(kp)
    else:
        kb = tl.load(kp, mask=dd[None, :] < D, other=0.0)
    s = tl.dot(kb, qt, input_precision=PRECISION)
    if MASKED:
        s = tl.where((n[:, None] <= pos[None, :]) & (n[:, None] < NK), s, float("-inf"))
    p = tl.exp2(s * qk_scale - norm[None, :])  # rows past R: norm +inf
    col = tl.sum(p, 1)
    if ATOMIC_COLS:
        tl.atomic_add(COLS + bh * NK + n, col, mask=n < NK, sem="relaxed")
    else:
        tl.store(COLS + bh * NK + n, col, mask=n < NK)


@triton.jit
def _phase_share(ML, OUT, STRIDE, R, NCH, C1, C2, tau, PHASES: tl.constexpr, BR: tl.constexpr, BCH: tl.constexpr,
                 PICK: tl.constexpr):
    """Per (batch, head): the statistics pass's chunks merged into each row's phase shares (its exp-sums over its
    phase's keys over its exp-sum over all keys), their mean over the rows (OUT [B·H, PHASES]) and, with ``PICK``,
    the first stride whose mean share reaches ``tau``, else 1 (STRIDE int64 [B·H])."""
    bh = tl.program_id(0)
    plane = tl.num_programs(0) * R * NCH
    ch = tl.arange(0, BCH)
    acc1 = tl.zeros([BR], tl.float32)
    acc2 = tl.zeros([BR], tl.float32)
    for r0 in range(0, R, BR):
        rows = r0 + tl.arange(0, BR)
        off = (bh * R + rows[:, None]) * NCH + ch[None, :]
        ok = (rows[:, None] < R) & (ch[None, :] < NCH)
        mc = tl.load(ML + off, mask=ok, other=float("-inf"))
        m = tl.max(mc, 1)
        w = tl.exp2(mc - tl.where(m == float("-inf"), 0.0, m)[:, None])  # chunks no key reached: weight 0
        l = tl.sum(tl.load(ML + plane + off, mask=ok, other=0.0) * w, 1)
        den = tl.where(l > 0.0, l, 1.0)
        acc1 += tl.sum(tl.load(ML + 2 * plane + off, mask=ok, other=0.0) * w, 1) / den
        if PHASES >= 2:
            acc2 += tl.sum(tl.load(ML + 3 * plane + off, mask=ok, other=0.0) * w, 1) / den
    s1 = tl.sum(acc1, 0) / R
    tl.store(OUT + bh * PHASES, s1)
    if PHASES >= 2:
        s2 = tl.sum(acc2, 0) / R
        tl.store(OUT + bh * PHASES + 1, s2)
    if PICK:  # the first stride reaching tau
        alt = 1
        if PHASES >= 2:
            alt = tl.where(s2 >= tau, C2, 1)
        tl.store(STRIDE + bh, tl.where(s1 >= tau, C1, alt).to(tl.int64))


def _chunks(nk: int, bn: int) -> tuple[int, int]:
    """Key tiles of ``bn`` per program and programs per (head, row chunk): one chunk per ``KEYS_PER_CHUNK`` keys, at
    most ``MAX_CHUNKS`` (``VIDSPARSE_ROW_CHUNKS=N``: N chunks at most, the A/B knob). Against 64 chunks at every
    length, the GPU ms of the whole estimate on an H200, 28/4 heads, video q/k (``--env-ab VIDSPARSE_ROW_CHUNKS=16,
    32,64``, ``profile_estimation_cov2_chunks_*.json``): at 16K keys (16 chunks) token_sparse 0.211 → 0.177, pbs
    0.420 → 0.387, vertical_slash 0.428 → 0.424; at 32K (32 chunks) token_sparse 0.343 → 0.312, pbs 0.777 → 0.747,
    vertical_slash 0.671 → 0.681. From 64K keys on, 64 chunks as before."""
    cap = env_int("VIDSPARSE_ROW_CHUNKS", min(MAX_CHUNKS, triton.cdiv(nk, KEYS_PER_CHUNK)))
    tpc = triton.cdiv(triton.cdiv(nk, bn), max(1, cap))
    return tpc, triton.cdiv(triton.cdiv(nk, bn), tpc)


def column_mass(q_rows, k, q_pos, scale: float | None = None, diagonal_first: int | None = None):
    """q_rows [B, H, R, D] at positions ``q_pos`` int [R]; k [B, Hkv, Nk, D] (GQA: not expanded; any strides) ->
    (cols, diag): float32 [B, H, Nk] each — Σ_r softmax(scale · q_r·Kᵀ) over the keys at or before each row's
    position, per key (``cols``) and, when ``diagonal_first`` is given (the rows are at positions diagonal_first,
    diagonal_first + 1, …), per diagonal offset o = position − key (``diag``, else None). ``scale`` defaults to
    1/√D. Equals ``row_probs(q_rows, k, q_pos, scale=scale).sum(2)`` (and ``diagonal_sums`` of it) up to fp32
    summation order."""
    a = _prepare(q_rows, k, q_pos, scale)
    b, h, r, nk = a.b, a.h, a.r, a.nk
    cols = torch.zeros(b, h, nk, dtype=torch.float32, device=a.q.device)  # tiles no row sees add nothing
    diag = torch.zeros(b, h, nk, dtype=torch.float32, device=a.q.device) if diagonal_first is not None else None
    if r == 0 or nk == 0:
        return cols, diag
    ml = _stats(a, ())
    nch = ml.shape[-1]
    if diag is None and env_choice("VIDSPARSE_COL_MASS", "keys", ("keys", "rows")) == "keys":
        bn = env_int("VIDSPARSE_COL_MASS_BN", COL_BN, 16, pow2=True)
        br = min(env_int("VIDSPARSE_COL_MASS_ROWS", COL_BR, 16, pow2=True), max(16, triton.next_power_of_2(r)))
        tpc2, nch2 = _chunks(nk, bn)
        rcs = triton.cdiv(r, br)
        _col_mass[(b * h, rcs, nch2)](
            a.q, a.k, a.pos, ml, cols, h, h // a.hk, r, nk, nch, tpc2, *a.common, D=a.d, BD=a.bd, BR=br, BN=bn,
            BCH=max(2, triton.next_power_of_2(nch)), PRECISION=a.precision, ATOMIC_COLS=rcs > 1, I64=a.i64,
            num_warps=env_int("VIDSPARSE_COL_MASS_WARPS", 4, 1, pow2=True), **_stages("VIDSPARSE_COL_MASS_STAGES"))
        return cols, diag
    tpc2, nch2 = _chunks(nk, BN)
    rcs = triton.cdiv(r, BR)
    _row_mass[(b * h, rcs, nch2)](
        a.q, a.k, a.pos, ml, cols, diag if diag is not None else cols, h, h // a.hk, r, nk, nch, tpc2,
        diagonal_first if diagonal_first is not None else 0, *a.common, D=a.d, BD=a.bd, BR=BR, BN=BN,
        BCH=max(2, triton.next_power_of_2(nch)), PRECISION=a.precision, ATOMIC_COLS=rcs > 1,
        DIAGONALS=diag is not None, I64=a.i64, num_warps=4)
    return cols, diag


def phase_mass(q_rows, k, q_pos, strides: tuple[int, ...], scale: float | None = None):
    """Each row's softmax mass on the keys of its own phase: float32 [B, H, R, len(strides)], entry (r, i) =
    Σ over keys j ≤ q_pos[r] with j ≡ q_pos[r] (mod strides[i]) of softmax(scale · q_r·Kᵀ)_j — what ``grid`` ranks
    its candidate strides by, without the [B, H, R, Nk] probability matrix (one or two strides; positions ≥ 0). A
    per-row quantity, so one pass suffices: the statistics pass also keeps each row's exp-sums over its phase's keys
    (rescaled with its running max, as the total is), and the key chunks' partial sums are merged in torch. Equals
    ``(row_probs(...) * same_phase).sum(-1)`` up to fp32 summation order."""
    if not 1 <= len(strides) <= 2 or min(strides) < 1:
        raise ValueError(f"phase_mass: one or two strides ≥ 1, not {strides}")
    a = _prepare(q_rows, k, q_pos, scale)
    b, h, r, nk = a.b, a.h, a.r, a.nk
    if r == 0 or nk == 0:
        return torch.zeros(b, h, r, len(strides), dtype=torch.float32, device=q_rows.device)
    ml = _stats(a, tuple(int(c) for c in strides))  # [2 + C, B·H, R, chunks]: max, sum, the phases' sums
    m = ml[0].amax(-1, keepdim=True)
    w = torch.exp2(ml[0] - torch.where(m == float("-inf"), 0.0, m))  # chunks no key reached: max -inf, weight 0
    l = (ml[1] * w).sum(-1)
    ph = (ml[2:] * w).sum(-1) / torch.where(l > 0, l, 1.0)
    return ph.permute(1, 2, 0).reshape(b, h, r, len(strides))


def phase_share(q_rows, k, q_pos, strides: tuple[int, ...], scale: float | None = None, tau: float | None = None):
    """``phase_mass(...).mean(2)`` — each stride's share of the rows' mass on their own phase, averaged over the
    rows: float32 [B, H, len(strides)] — with the chunks' statistics merged in one Triton program per head instead
    of about ten torch launches (what ``grid`` asks in every layer). With ``tau`` also (shares, stride int64 [B, H]):
    per head the first of ``strides`` whose share reaches ``tau``, else 1 (``grid``'s choice)."""
    if not 1 <= len(strides) <= 2 or min(strides) < 1:
        raise ValueError(f"phase_share: one or two strides ≥ 1, not {strides}")
    a = _prepare(q_rows, k, q_pos, scale)
    b, h, r, nk = a.b, a.h, a.r, a.nk
    out = torch.zeros(b, h, len(strides), dtype=torch.float32, device=q_rows.device)
    stride = torch.ones(b, h, dtype=torch.int64, device=q_rows.device)
    if r and nk:
        ml = _stats(a, tuple(int(c) for c in strides))
        nch = ml.shape[-1]
        bch = max(2, triton.next_power_of_2(nch))
        cs = (list(strides) + [1])[:2]
        br = max(2, min(triton.next_power_of_2(r), MERGE_ENTRIES // bch))
        _phase_share[(b * h,)](ml, out, stride, r, nch, *cs, 0.0 if tau is None else float(tau),
                               PHASES=len(strides), BR=br, BCH=bch, PICK=tau is not None, num_warps=4)
    elif tau is not None and tau <= 0:  # no row or no key: every share is 0, reaching only a tau ≤ 0
        stride.fill_(int(strides[0]))
    return (out, stride) if tau is not None else out


@dataclass(frozen=True)
class _Rows:
    """What both passes take: the checked shapes, the inputs (k in q's dtype, positions int32) and the launch
    arguments shared by ``_row_stats`` and ``_row_mass``."""

    b: int
    h: int
    hk: int
    r: int
    nk: int
    d: int
    q: torch.Tensor
    k: torch.Tensor
    pos: torch.Tensor
    common: tuple  # q's and k's strides, the scale in log2 units
    bd: int
    precision: str
    i64: bool


def _prepare(q_rows, k, q_pos, scale) -> _Rows:
    """Checks the shapes and gathers what both passes take."""
    b, h, r, d = q_rows.shape
    hk, nk = k.shape[1], k.shape[2]
    if h % hk or k.shape[0] != b or k.shape[-1] != d or q_pos.shape != (r,):
        raise ValueError(f"row_mass: q_rows {tuple(q_rows.shape)}, k {tuple(k.shape)}, q_pos "
                         f"{tuple(q_pos.shape)} do not match")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not scale > 0:  # the statistics pass takes the max of the unscaled products (``_stats_tile``)
        raise ValueError(f"row_mass: the softmax scale must be positive, not {scale}")
    k = k if k.dtype == q_rows.dtype else k.to(q_rows.dtype)  # the kernels' products take one dtype
    return _Rows(b, h, hk, r, nk, d, q_rows, k, q_pos.to(device=q_rows.device, dtype=torch.int32).contiguous(),
                 (*q_rows.stride(), *k.stride(), scale * LOG2E), max(16, triton.next_power_of_2(d)),
                 "ieee" if q_rows.dtype == torch.float32 else "tf32", needs_int64(q_rows, k))


def _stats(a: _Rows, strides: tuple[int, ...]) -> torch.Tensor:
    """The statistics pass: float32 [2 + len(strides), B·H, R, chunks] — each row's max and exp-sum per key chunk,
    and with ``strides`` its exp-sums over the keys of its own phase."""
    bn = env_int("VIDSPARSE_ROW_STATS_BN", BN_STATS, 16, pow2=True)
    tpc, nch = _chunks(a.nk, bn)
    ml = torch.empty(2 + len(strides), a.b * a.h, a.r, nch, dtype=torch.float32, device=a.q.device)
    cs = (list(strides) + [1, 1])[:2]
    _row_stats[(a.b * a.h, triton.cdiv(a.r, BR), nch)](
        a.q, a.k, a.pos, ml, a.h, a.h // a.hk, a.r, a.nk, tpc, nch, *cs, *a.common, D=a.d, BD=a.bd, BR=BR,
        BN=bn, PRECISION=a.precision, PHASES=len(strides), I64=a.i64,
        num_warps=env_int("VIDSPARSE_ROW_STATS_WARPS", 4, 1, pow2=True), **_stages("VIDSPARSE_ROW_STATS_STAGES"))
    return ml


def _stages(var: str) -> dict:
    """``num_stages`` for a launch where the environment variable ``var`` sets it (an A/B knob), else Triton's
    default."""
    n = env_int(var, 0, 0)
    return {"num_stages": n} if n else {}
