"""XAttention's block mass in one Triton kernel: the strided (antidiagonal) scores, their row softmax and its sums per
(query block, key block), without materialising the score matrix.

The torch path (``patterns/xattention.py``) interleaves Q and K at stride S into copies, runs one GEMM per chunk of
query blocks that writes an (N/S)² score matrix, then reads it back for the softmax and the block sums. At 128K tokens
and S = 8 that is about 7.5 GB of scores written and read twice. Here each program owns ``BM`` strided rows (whole
query blocks) of one head and a share of their key columns, walked in tiles of ``BN``:

1. The tile's scores are S products of [BM, D] query rows by [D, BN] key rows. On Hopper they come through the
   tensor-memory accelerator as boxes of a [B·heads, N/S, S·D] view of q and k (row i of the antidiagonal pairs
   token i·S + S−1−j with key token c·S + j: phase j is the view's columns j·D..(j+1)·D), elsewhere as strided
   pointer loads; no interleaved copies exist; GQA reads the shared key head. Each phase runs in steps of
   ``block_d`` head-dim columns (64 by default): smaller pipeline stages, so that two programs share an SM.
2. An online softmax keeps each row's running max and sum; each row's unnormalised mass in each key block of the tile
   is stored as one log2-domain value (running max + log2 of the partial sum) in a scratch of [rows, key blocks],
   ``block_k``/S times smaller than the scores (a key block spans that many strided columns). Only tiles that reach
   past the key end or the row tile's first diagonal apply the element mask.
3. A row tile's column tiles are split over ``splits`` programs, launched side by side. Each writes its rows' max and
   sum; the last to finish (an atomic count per row tile) merges them into each row's log-sum, rereads the row
   tile's scratch and adds exp2(partial − row log-sum) over the rows of each query block: the block's softmax mass.
   The split is meant for the L2 cache: each program rereads its [BM, S·D] query rows once per column tile, and
   with one program per row tile the rows of all resident programs (~34 MB at BM = 128 on 132 SMs) did not stay in
   L2 between rereads (Nsight Compute on the unsplit kernel: L2 hit rate ~30%, the loads waiting on DRAM); with
   the split fewer distinct rows are resident. The hit rate after the split has not been measured, only the time.

Columns past each row's causal diagonal (and past the key length) are masked as in the torch path; tiles past the
row tile's last diagonal are never computed, and their key blocks get zero mass.

Measured on an H100 at 128K tokens, 28/4 heads (``benchmarks/profile_estimation.py --antidiagonal``, BENCHMARKS.md):
the kernel took 21.3 ms at S = 8 and 11.3 ms at S = 16 with strided pointer loads and one program per row tile;
TMA loads 20.0 / 10.3 ms; split in two 18.9 / 9.6 ms; the defaults (128 × 128 tiles, 3 stages, 4 splits, the
interior tiles unmasked) about 17.5 / 8.6 ms, about 440 TF/s on the causal products (N²·D/S per head). The cuBLAS
GEMM + score matrix + softmax-block-sum path it replaced took 31.9 / 18.2 ms for the whole estimate.

Tried on an H200 and reverted (commit abb0e93, ``profile_estimation_antidiag{FOLD,OVERLAP}_*.json``, in-process A/B
of xattention's estimate): applying the scale inside the exponent's multiply-add instead of as its own pass made
stride 8 slower (17.6-17.7 → 18.8-19.4 ms at 128K, ~1.2 → 1.25 ms at 32K), and deferring each tile's softmax to the
next tile's first phase, to overlap it with that phase's product, slower still (18.7 → 21.7-22.1 ms at 128K).
Wider tiles (256 query rows, 8 or 16 warps, 2 stages) were 13-25% slower at 32K and 128K, 4 warps within noise
(``profile_estimation_antidiag_sweep_*.json`` on the H200). Nsight Compute on the H200 on the whole-D kernel of
then (32K, stride 8, ``ncu_antidiag_{details,log0}_32768_s8.txt``; the head-dim steps since are in
``antidiagonal_block_mass``'s docstring): 1.05 ms, L2 throughput 63%, SM (tensor) 49%, one 8-warp program per SM
(165 registers, 201 KB shared memory); the per-tile log-partials' move from the product's register layout to the
store's goes through shared memory with 7-10-way bank conflicts (~14M conflicts per launch). Dropping the
``part > 0`` select (log2(0) is -inf already) removed one of the three layout moves but not the conflicts, and no
time (``profile_estimation_antidiagLOG0_*.json``); it stays as the simpler form."""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import fit
from .fit import needs_int64

LOG2E = 1.4426950408889634
SCRATCH_BYTES = 512 << 20  # the log-partial scratch is bounded by processing heads in groups
HEAD_GROUP_MB = 4  # K megabytes the programs in flight together read (``head_group``); 0: every head at once


def head_group(group: int, k_bytes_per_head: int) -> int:
    """Query heads whose programs run together (``antidiagonal_block_mass``'s ``heads_together``): whole K/V-head
    groups (``group`` query heads each) whose K, ``k_bytes_per_head`` bytes per K/V head, fits in
    ``VIDSPARSE_ANTIDIAG_HEAD_MB`` megabytes (default ``HEAD_GROUP_MB``); at least one K/V head; 0 MB: all heads.

    Every program of a row tile reads K from its start, so programs of one head in flight together share K in L2,
    and programs of many heads evict each other's: with all heads issued together (the order before, longest row
    tiles of every head first), 28 query heads over 28 K/V heads read 28 heads' K at once (235 MB at 32K tokens,
    against the H200's 50 MB L2) where 28 over 4 read 4. On an H200 (``profile_estimation.py --env-ab
    VIDSPARSE_ANTIDIAG_HEAD_MB=0,12,24,48``, two interleaved repetitions; ``profile_estimation_headmb_*.json``),
    12 MB, here one K/V head's query heads at a time, took 0.70–0.81× the time of all heads at once on 28/28 heads at
    32K–128K, strides 8 and 16 (1.44 → 1.03 ms at 32K, stride 8), and 0.95–1.05× on 28/4 (level within the run's
    spread); 24 and 48 MB were no faster. The default went from 12 to 4 MB after 8 splits per row tile
    (``default_splits``): from 16K tokens on (d = 128, 16-bit) that is one K/V head's query heads at a time, as
    12 MB was from 32K on, so only shorter inputs changed. At 16K (``--env-ab VIDSPARSE_ANTIDIAG_HEAD_MB=4,12``,
    ``profile_estimation_s119_headmb_*.json``, xattention's whole estimate): 28/28 heads 0.2880 → 0.2801 ms at
    stride 8 (0.1806 → 0.1796 at 16), 28/4 heads 0.2726 → 0.2676 (0.1769 → 0.1727); at 8K on 28/28 level
    (0.0978 → 0.0969); 24 MB slower at 16K on 28/28 (0.2913 against 0.2856 for 12, ``s118``)."""
    mb = fit.env_int("VIDSPARSE_ANTIDIAG_HEAD_MB", HEAD_GROUP_MB, minimum=0)
    if mb == 0:
        return 1 << 30
    return group * max(1, (mb << 20) // k_bytes_per_head)


@triton.jit
def _antidiagonal_mass(Q, K, LP, ML, CNT, OUT, s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_km, s_kd, s_pb, s_pm, s_ob, s_oh,
                       s_om, s_on, bh0, H, GROUP, NQ, NK, R, RP, NKB, col_lim, off_s, qk_scale, NH, NRT, HG,
                       S: tl.constexpr, D: tl.constexpr, QR: tl.constexpr, KC: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, KBT: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                       NUM_STAGES: tl.constexpr, TMA: tl.constexpr, SPLITS: tl.constexpr, DK: tl.constexpr,
                       I64: tl.constexpr):
    # program -> (head i of this launch's NH, row tile, split): heads in groups of HG, one group after the other;
    # within a group the longest row tiles first, and the group's heads fastest, so that the programs in flight
    # together read the K of HG heads (``head_group``)
    pid = tl.program_id(0)
    per_group = HG * NRT * SPLITS
    g = pid // per_group
    r = pid - g * per_group
    hn = tl.minimum(HG, NH - g * HG)  # the last group may be smaller
    i = g * HG + r % hn
    split = (r // hn) % SPLITS  # this program's share of the row tile's column tiles
    nrt = NRT
    pid_m = nrt - 1 - r // hn // SPLITS
    bh = bh0 + i
    b = bh // H
    h = bh % H
    hk = h // GROUP
    ob, oh, ohk = b, h, hk  # for pointer offsets (TMA coordinates stay int32)
    if I64:  # offsets past 2^31 (``fit.needs_int64``): 28 heads of 600K tokens, or a late row of a transposed view
        ob, oh, ohk = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DK)
    P: tl.constexpr = S * (D // DK)  # product steps per column tile: S phases of D // DK head-dim slices each
    if not TMA:
        q_base = Q + ob * s_qb + oh * s_qh + offs_d[None, :] * s_qd
        k_base = K + ob * s_kb + ohk * s_kh + offs_d[:, None] * s_kd
    hi = tl.minimum(NKB * KC, col_lim)
    if CAUSAL:
        hi = tl.minimum(hi, pid_m * BM + BM + off_s)  # no column past the tile's last diagonal
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    lp_rows = LP + i * s_pb + rows[:, None] * s_pm
    # one flat loop over (column tile, stride phase) so that the loads pipeline across tiles; a tile's epilogue runs
    # on its last phase
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    per = tl.cdiv(tl.cdiv(hi, BN), SPLITS)
    for t in tl.range(split * per * P, tl.minimum(tl.cdiv(hi, BN), split * per + per) * P, num_stages=NUM_STAGES):
        j = (t % P) // (D // DK)
        dk = (t % (D // DK)) * DK  # the head-dim slice of this step
        c0 = (t // P) * BN
        cols = c0 + tl.arange(0, BN)
        if TMA:  # Q/K are [B·heads, N/S, S·D] descriptors: phase j of a strided row is columns j·D..(j+1)·D
            qj = Q.load([bh, pid_m * BM, (S - 1 - j) * D + dk]).reshape(BM, DK)
            kj = tl.trans(K.load([b * (H // GROUP) + hk, c0, j * D + dk]).reshape(BN, DK))
        else:
            q_tok = rows * S + (S - 1 - j)
            k_tok = cols * S + j
            if I64:
                q_tok, k_tok = q_tok.to(tl.int64), k_tok.to(tl.int64)
            qj = tl.load(q_base + dk * s_qd + q_tok[:, None] * s_qm, mask=q_tok[:, None] < NQ, other=0.0)
            kj = tl.load(k_base + dk * s_kd + k_tok[None, :] * s_km, mask=k_tok[None, :] < NK, other=0.0)
        acc = tl.dot(qj, kj, acc, input_precision=PRECISION)
        if t % P == P - 1:
            sc = acc * qk_scale
            # only tiles that reach past the key end or the row tile's first diagonal need the element mask
            edge = c0 + BN > hi
            if CAUSAL:
                edge = edge | (c0 + BN - 1 > pid_m * BM + off_s)
            if edge:
                valid = cols[None, :] < hi
                if CAUSAL:
                    valid = valid & (cols[None, :] <= rows[:, None] + off_s)
                sc = tl.where(valid, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
            p = tl.math.exp2(sc - m_sub[:, None])
            l = l * tl.math.exp2(m - m_sub) + tl.sum(p, 1)
            m = m_new
            part = tl.sum(tl.reshape(p, [BM, BN // KC, KC]), 2)
            lpart = m_sub[:, None] + tl.math.log2(part)  # log2(0) = -inf: a block with no mass needs no select
            kb = c0 // KC + tl.arange(0, BN // KC)
            tl.store(lp_rows + kb[None, :], lpart, mask=(rows[:, None] < R) & (kb[None, :] < NKB))
            acc = tl.zeros([BM, BN], dtype=tl.float32)
    ml_rows = ML + (i * SPLITS + split) * 2 * RP + rows
    tl.store(ml_rows, m)
    tl.store(ml_rows + RP, l)
    tl.debug_barrier()  # every thread's partials are written before the arrival below publishes them
    # the row tile's last split to arrive combines the splits' softmax sums and writes the block masses
    if tl.atomic_add(CNT + i * nrt + pid_m, 1, sem="acq_rel") == SPLITS - 1:
        mx = tl.full([BM], float("-inf"), dtype=tl.float32)
        for c in tl.static_range(SPLITS):
            mx = tl.maximum(mx, tl.load(ML + (i * SPLITS + c) * 2 * RP + rows, cache_modifier=".cg"))
        mx_sub = tl.where(mx == float("-inf"), 0.0, mx)
        l = tl.zeros([BM], dtype=tl.float32)
        for c in tl.static_range(SPLITS):
            other = ML + (i * SPLITS + c) * 2 * RP + rows
            l += tl.load(other + RP, cache_modifier=".cg") * tl.math.exp2(tl.load(other, cache_modifier=".cg") -
                                                                             mx_sub)
        lse = tl.where(l > 0, mx + tl.math.log2(l), 0.0)  # a row that saw nothing has only -inf partials
        kb_hi = (hi + KC - 1) // KC
        qb = pid_m * (BM // QR) + tl.arange(0, BM // QR)
        for kb0 in range(0, NKB, KBT):
            kb = kb0 + tl.arange(0, KBT)
            lp = tl.load(lp_rows + kb[None, :], mask=(rows[:, None] < R) & (kb[None, :] < kb_hi),
                         other=float("-inf"), cache_modifier=".cg")
            pr = tl.math.exp2(lp - lse[:, None])
            mass = tl.sum(tl.reshape(pr, [BM // QR, QR, KBT]), 1)
            tl.store(OUT + ob * s_ob + oh * s_oh + qb[:, None] * s_om + kb[None, :] * s_on, mass,
                     mask=(qb[:, None] * QR < R) & (kb[None, :] < NKB))


def default_splits(heads: int, row_tiles: int, col_tiles: int, device) -> int:
    """Programs per row tile (``antidiagonal_block_mass``'s ``splits``): 4, or 8 where the programs of the heads
    issued together (``head_group``) would be fewer than two per SM with 4 and the longest row tile has at least 8
    column tiles. ``VIDSPARSE_ANTIDIAG_SPLITS=N`` fixes N (0: this rule).

    That is 28/28 heads from 16K to 64K tokens at stride 8 (one head per group; measured with the 12 MB groups of
    then, 3 heads at 16K, one from 32K) and 32K–64K at stride 16; 28/4 heads launch enough programs with 4.
    Measured on an H200 (``benchmarks/profile_estimation.py --env-ab VIDSPARSE_ANTIDIAG_SPLITS=4,8``, xattention's
    whole estimate, GPU ms, ``profile_estimation_s116_splits_*.json``): 28/28 at 16K, stride 8, 0.2968 / 0.2892 ms
    with 4 / 8 (6: 0.2897, 16: 0.2948), stride 16 (4 column tiles) 0.1817 / 0.1916; at 32K 1.112 / 1.003 and
    0.611 / 0.588; 28/4 at 16K 0.2705 / 0.2771 and 0.1768 / 0.1883, at 64K 3.820 / 3.906 and 2.098 / 2.014. The
    rule against 4 (``=4,0``, ``s117``, 28/28): stride 8 at 16K 0.2967 / 0.2870, 32K 1.114 / 1.004, 64K 4.008 /
    3.815; stride 16 at 64K 2.125 / 2.076, level at 16K and 32K."""
    fixed = fit.env_int("VIDSPARSE_ANTIDIAG_SPLITS", 0, minimum=0)
    if fixed:
        return fixed
    return 8 if heads * row_tiles * 4 < 2 * fit.sm_count(device) and col_tiles >= 8 else 4


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def supported(q, k, stride: int, block_q: int, block_k: int) -> bool:
    """Whether the kernel computes this call: power-of-two strided blocks (``block/stride``) and head dim ≥ 16."""
    return (_pow2(block_q // stride) and _pow2(block_k // stride) and _pow2(q.shape[-1]) and q.shape[-1] >= 16
            and q.dtype == k.dtype)


def tma_fits(q, k, stride: int) -> bool:
    """Whether the strided rows can come through the tensor-memory accelerator: a Hopper (or later) GPU, 16-bit
    inputs and lengths that are stride multiples (a [N/S, S·D] row then holds whole tokens of one head)."""
    return (q.is_cuda and fit.capability(q.device)[0] >= 9 and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[2] % stride == 0 and k.shape[2] % stride == 0)


def _strided_rows(x, stride: int, rows: int, width: int):
    """x [B, heads, N, D] as a TMA descriptor over [B·heads, N/S, S·D] with [1, ``rows``, ``width``] boxes (x is
    copied when not contiguous, as a model's transposed q/k are) -> (descriptor, the tensor it reads)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, n, d = x.shape
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous()
    return TensorDescriptor(x, [b * h, n // stride, stride * d], [n * d, stride * d, 1], [1, rows, width]), x


def launch_defaults(stride: int, d: int, block_n: int | None = None, num_warps: int | None = None,
                    block_d: int | None = None) -> tuple[int, int, int]:
    """(key columns per tile, warps, head-dim columns per step) for a stride and head dim, where not given (see
    ``antidiagonal_block_mass``)."""
    if block_n is None:
        block_n = 128 if stride <= 8 else 256
    if num_warps is None:
        num_warps = 4 if block_n <= 128 else 8
    return block_n, num_warps, min(d, 64) if block_d is None else block_d


def fitting_launches(stride: int, d: int, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> list[tuple[int, int, int]]:
    """(key columns per tile, warps, stages) to try, best first (``fit.launch_fitting``): the defaults, then, where
    the caller left them open, 128-column tiles with 4 warps (72 KB at sm_86 whatever the stride, against 104 KB for
    the 256-column default at stride 16) and 2 stages. Their order follows an H200 run with pointer loads, as a GPU
    without TMA loads (``profile_estimation_fitchain_ptr.json``, 32K, stride 16): 0.57 ms for the default, 0.63 for
    128 columns and 4 warps, 0.71-0.74 for that with 2 stages, 0.75-0.78 for the default with 2 stages. On the GPUs
    the smaller launches are for they are unmeasured."""
    tile, warps, _ = launch_defaults(stride, d, block_n, num_warps)
    stages = 3 if num_stages is None else num_stages
    chain = [(tile, warps, stages)]
    if block_n is None and num_warps is None:
        chain.append((128, 4, stages))
    if num_stages is None:
        chain.append((chain[-1][0], chain[-1][1], 2))
    return list(dict.fromkeys(chain))


def antidiagonal_block_mass(q, k, stride: int, block_q: int, block_k: int, causal: bool,
                            block_m: int = 128, block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, tma: bool | None = None, splits: int | None = None,
                            block_d: int | None = None, heads_together: int | None = None):
    """q [B, H, Nq, D], k [B, Hkv, Nk, D] (any strides; GQA without expanding k) -> float32 [B, H, NQB, NKB]: per
    query block, the row softmax of XAttention's strided scores (scale 1/(√D·S); zero-padded rows and keys as the
    torch path pads them; causal with the end-aligned diagonal) summed over each key block's columns and the block's
    rows. ``block_m``/``block_n``: strided rows and columns per program and per column tile (at least one block);
    ``tma``: load through TMA descriptors (default: on Hopper and later, for 16-bit inputs whose lengths are stride
    multiples); ``splits``: programs per row tile, each taking a contiguous share of its column tiles (default
    ``default_splits``); ``block_d``: head-dim columns per product step (a power of two ≥ 16 dividing D; each stride
    phase takes D / ``block_d`` steps). ``heads_together``: the query heads whose programs are issued together,
    longest row tiles first, before the next such group's (default ``head_group``); any value computes the same
    result.

    Defaults, from ``benchmarks/profile_estimation.py --antidiagonal`` (BM/BN/warps/stages/loads/splits/width;
    BENCHMARKS.md, "xattention estimation kernel"): 128 query rows, 3 stages, 4 splits (8 where ``default_splits``
    says; on an H100, 3 and 4 splits were within noise at stride 8, 4 ahead at 16), 64-column steps, and by stride:

    - S ≤ 8: 128 key columns, 4 warps. With 64-column steps a stage is 32 KB, so three take 100 KB and two programs
      fit on an SM: one program's softmax runs beside the other's products. On an H200
      (``profile_estimation_antidiag_slices{,2}_*.json``, two processes, two repetitions each) this took 15.1-15.9 ms
      at 128K against 16.0-16.3 ms with whole-D steps (one 201 KB program per SM), and 0.99-1.13 against 1.06-1.08 ms
      at 32K. 8 warps (1.10-1.12 ms at 32K) and 256-column tiles (1.07-1.08) were no faster. Nsight Compute at 32K
      (``ncu_antidiag_slices_32768_s8.txt``): 172 registers and 100 KB per program, two per SM by both limits;
      0.89 ms against the whole-D kernel's 1.05; L2 throughput 78% (63%), SM throughput 64% (49%). The L2 is now
      the nearer limit: each program rereads its [BM, S·D] rows per column tile.
    - S ≥ 16: 256 key columns, 8 warps (255 registers, none spilled; 152 KB; one program per SM). On the H200:
      7.91-7.94 ms at 128K against 8.40-8.71 ms for the earlier default (128 × 128, whole-D steps, 8 warps), and
      0.54-0.55 against 0.56-0.57 ms at 32K; four stages were level with three. Nsight Compute at 32K
      (``ncu_antidiag_slices_32768_s16.txt``): 0.50 ms, L2 throughput 60%, SM throughput 59%.

    On a GPU with less shared memory per program than Hopper's 227 KB the launch steps down ``fitting_launches``
    (``fit.launch_fitting``): at 99 KB (GA10x, Ada) stride ≥ 16 takes 128-column tiles with 4 warps.

    Earlier, with whole-D steps: 4 warps were faster at stride 8 in five of six repetitions over three sweeps, by
    0.4-3.9%, and 4-7% slower at 16 (``profile_estimation_antidiag_sweep_*.json``). Strides below 8 are
    unmeasured."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    s = stride
    dk = launch_defaults(s, d, block_d=block_d)[2]
    if dk < 16 or d % dk or not _pow2(dk):
        raise ValueError(f"antidiagonal_block_mass: block_d {dk} must be a power of two ≥ 16 dividing D = {d}")
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    qr, kc = block_q // s, block_k // s
    bm = max(block_m, qr, 16)
    r = nqb * qr
    out = torch.empty(b, h, nqb, nkb, dtype=torch.float32, device=q.device)  # every entry is written
    hg = head_group(h // hk, nk * d * k.element_size()) if heads_together is None else heads_together
    if hg < 1:
        raise ValueError(f"antidiagonal_block_mass: heads_together must be at least 1, got {hg}")
    if splits is None:
        splits = default_splits(min(b * h, hg), triton.cdiv(r, bm), triton.cdiv(-(-nk // s), max(
            launch_defaults(s, d, block_n)[0], kc, 16)), q.device)
    per_head = triton.cdiv(r, bm) * bm * nkb * 4
    group = max(1, min(b * h, SCRATCH_BYTES // per_head))
    rp = triton.cdiv(r, bm) * bm
    lp = torch.empty(group, rp, nkb, dtype=torch.float32, device=q.device)
    ml = torch.empty(group, splits, 2, rp, dtype=torch.float32, device=q.device)  # each split's row max and sum
    arrived = torch.zeros(-(-b * h // group), group, rp // bm, dtype=torch.int32, device=q.device)  # per row tile
    kbt = max(16, min(64, triton.next_power_of_2(nkb)))
    if tma is None:
        tma = tma_fits(q, k, s)
    i64 = needs_int64(out) if tma else needs_int64(q, k, out)  # TMA boxes take int32 coordinates into any size

    def launch(config):
        tile_n, warps, stages = config
        bn = max(tile_n, kc, 16)
        # q, k: any copies, alive to the end
        (qa, qt), (ka, kt) = (_strided_rows(q, s, bm, dk), _strided_rows(k, s, bn, dk)) if tma else ((q, q), (k, k))
        for bh0 in range(0, b * h, group):
            n = min(group, b * h - bh0)
            _antidiagonal_mass[(n * (rp // bm) * splits,)](
                qa, ka, lp, ml, arrived[bh0 // group], out, *qt.stride(), *kt.stride(), lp.stride(0), lp.stride(1),
                *out.stride(),
                bh0, h, h // hk, nq, nk, r, rp, nkb, -(-nk // s), (nk - nq) // s, LOG2E / (d ** 0.5 * s),
                n, rp // bm, min(n, hg),
                S=s, D=d, QR=qr, KC=kc, BM=bm, BN=bn, KBT=kbt, CAUSAL=causal,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NUM_STAGES=stages, TMA=tma,
                SPLITS=splits, DK=dk, I64=i64, num_warps=warps,
            )

    shape = (s, d, dk, bm, q.dtype, tma, splits, block_n, num_warps, num_stages)
    fit.launch_fitting("antidiagonal_block_mass", q.device, shape,
                       fitting_launches(s, d, block_n, num_warps, num_stages), launch)
    return out
