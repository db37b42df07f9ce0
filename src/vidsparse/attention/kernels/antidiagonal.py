"""XAttention's block mass in one Triton kernel: the strided (antidiagonal) scores, their row softmax and its sums per
(query block, key block), without materialising the score matrix.

The torch path (``patterns/xattention.py``) interleaves Q and K at stride S into copies, runs one GEMM per chunk of
query blocks that writes an (N/S)² score matrix, then reads it back for the softmax and the block sums. At 128K tokens
and S = 8 that is about 7.5 GB of scores written and read twice. Here each program owns ``BM`` strided rows (whole
query blocks) of one head and walks their key columns in tiles of ``BN``:

1. The tile's scores are S products of [BM, D] query rows by [D, BN] key rows, loaded straight from q and k at stride
   S (row i of the antidiagonal pairs token i·S + S−1−j with key token c·S + j), so no interleaved copies exist;
   GQA reads the shared key head.
2. An online softmax keeps each row's running max and sum; each row's unnormalised mass in each key block of the tile
   is stored as one log2-domain value (running max + log2 of the partial sum) in a scratch of [rows, key blocks],
   ``block_k``/S times smaller than the scores (a key block spans that many strided columns).
3. After the column walk the program rereads its own scratch rows and adds exp2(partial − row log-sum) over the rows
   of each query block: the block's softmax mass.

Columns past each row's causal diagonal (and past the key length) are masked as in the torch path; tiles past the
row tile's last diagonal are never computed, and their key blocks get zero mass.

On an H100 at 128K tokens (28/4 heads) the whole xattention estimate takes 14.4 ms at S = 16 and 24.2 ms at S = 8,
against 18.2 and 31.9 ms for the cuBLAS GEMM + score matrix + softmax-block-sum kernel it replaced (BENCHMARKS.md).
The kernel itself reaches about 350-370 TF/s on the causal products (N²·D/S per head), about half the rate of the
cuBLAS GEMMs in the path it replaced: Nsight Compute (``benchmarks/ncu_target.py``) shows it waiting on its strided
loads (L2 hit rate ~30%, one 8-warp program per SM at 255 registers), so TMA loads of a [N/S, S, D] view or a
warp-specialised version are the next step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SCRATCH_BYTES = 512 << 20  # the log-partial scratch is bounded by processing heads in groups


@triton.jit
def _antidiagonal_mass(Q, K, LP, OUT, s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_km, s_kd, s_pb, s_pm, s_ob, s_oh,
                       s_om, s_on, bh0, H, GROUP, NQ, NK, R, NKB, col_lim, off_s, qk_scale,
                       S: tl.constexpr, D: tl.constexpr, QR: tl.constexpr, KC: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, KBT: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                       NUM_STAGES: tl.constexpr):
    i = tl.program_id(0)  # head within this group (fastest: the longest row tiles of every head go first)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    bh = bh0 + i
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q_base = Q + b * s_qb + h * s_qh + offs_d[None, :] * s_qd
    k_base = K + b * s_kb + hk * s_kh + offs_d[:, None] * s_kd
    hi = tl.minimum(NKB * KC, col_lim)
    if CAUSAL:
        hi = tl.minimum(hi, pid_m * BM + BM + off_s)  # no column past the tile's last diagonal
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    lp_rows = LP + i * s_pb + rows[:, None] * s_pm
    # one flat loop over (column tile, stride phase) so that the loads pipeline across tiles; a tile's epilogue runs
    # on its last phase
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in tl.range(0, tl.cdiv(hi, BN) * S, num_stages=NUM_STAGES):
        j = t % S
        c0 = (t // S) * BN
        cols = c0 + tl.arange(0, BN)
        q_tok = rows * S + (S - 1 - j)
        k_tok = cols * S + j
        qj = tl.load(q_base + q_tok[:, None] * s_qm, mask=q_tok[:, None] < NQ, other=0.0)
        kj = tl.load(k_base + k_tok[None, :] * s_km, mask=k_tok[None, :] < NK, other=0.0)
        acc = tl.dot(qj, kj, acc, input_precision=PRECISION)
        if j == S - 1:
            valid = cols[None, :] < hi
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + off_s)
            sc = tl.where(valid, acc * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
            p = tl.math.exp2(sc - m_sub[:, None])
            l = l * tl.math.exp2(m - m_sub) + tl.sum(p, 1)
            m = m_new
            part = tl.sum(tl.reshape(p, [BM, BN // KC, KC]), 2)
            lpart = tl.where(part > 0, m_sub[:, None] + tl.math.log2(part), float("-inf"))
            kb = c0 // KC + tl.arange(0, BN // KC)
            tl.store(lp_rows + kb[None, :], lpart, mask=(rows[:, None] < R) & (kb[None, :] < NKB))
            acc = tl.zeros([BM, BN], dtype=tl.float32)
    lse = tl.where(l > 0, m + tl.math.log2(l), 0.0)  # a row that saw nothing has only -inf partials
    tl.debug_barrier()  # the scratch rows written above are reread by other threads of this program
    kb_hi = (hi + KC - 1) // KC
    qb = pid_m * (BM // QR) + tl.arange(0, BM // QR)
    for kb0 in range(0, NKB, KBT):
        kb = kb0 + tl.arange(0, KBT)
        lp = tl.load(lp_rows + kb[None, :], mask=(rows[:, None] < R) & (kb[None, :] < kb_hi), other=float("-inf"))
        pr = tl.math.exp2(lp - lse[:, None])
        mass = tl.sum(tl.reshape(pr, [BM // QR, QR, KBT]), 1)
        tl.store(OUT + b * s_ob + h * s_oh + qb[:, None] * s_om + kb[None, :] * s_on, mass,
                 mask=(qb[:, None] * QR < R) & (kb[None, :] < NKB))


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def supported(q, k, stride: int, block_q: int, block_k: int) -> bool:
    """Whether the kernel computes this call: power-of-two strided blocks (``block/stride``) and head dim ≥ 16."""
    return (_pow2(block_q // stride) and _pow2(block_k // stride) and _pow2(q.shape[-1]) and q.shape[-1] >= 16
            and q.dtype == k.dtype)


def antidiagonal_block_mass(q, k, stride: int, block_q: int, block_k: int, causal: bool,
                            block_m: int = 128, block_n: int = 256, num_warps: int = 8, num_stages: int = 2):
    """q [B, H, Nq, D], k [B, Hkv, Nk, D] (any strides; GQA without expanding k) -> float32 [B, H, NQB, NKB]: per
    query block, the row softmax of XAttention's strided scores (scale 1/(√D·S); zero-padded rows and keys as the
    torch path pads them; causal with the end-aligned diagonal) summed over each key block's columns and the block's
    rows. ``block_m``/``block_n``: strided rows and columns per program and per column tile (at least one block).
    The defaults (128 × 256, 8 warps, 2 stages) were the fastest of six on an H100 at 128K tokens
    (``benchmarks/profile_estimation.py --antidiagonal``): tied at S = 8, 8–11% ahead at S = 16."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    s = stride
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    qr, kc = block_q // s, block_k // s
    bm, bn = max(block_m, qr, 16), max(block_n, kc, 16)
    r = nqb * qr
    out = torch.empty(b, h, nqb, nkb, dtype=torch.float32, device=q.device)  # every entry is written
    per_head = triton.cdiv(r, bm) * bm * nkb * 4
    group = max(1, min(b * h, SCRATCH_BYTES // per_head))
    lp = torch.empty(group, triton.cdiv(r, bm) * bm, nkb, dtype=torch.float32, device=q.device)
    kbt = max(16, min(64, triton.next_power_of_2(nkb)))
    for bh0 in range(0, b * h, group):
        n = min(group, b * h - bh0)
        _antidiagonal_mass[(n, triton.cdiv(r, bm))](
            q, k, lp, out, *q.stride(), *k.stride(), lp.stride(0), lp.stride(1), *out.stride(),
            bh0, h, h // hk, nq, nk, r, nkb, -(-nk // s), (nk - nq) // s, LOG2E / (d ** 0.5 * s),
            S=s, D=d, QR=qr, KC=kc, BM=bm, BN=bn, KBT=kbt, CAUSAL=causal,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NUM_STAGES=num_stages, num_warps=num_warps,
        )
    return out
