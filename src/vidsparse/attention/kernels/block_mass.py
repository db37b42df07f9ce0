"""Row softmax of a score matrix, summed into blocks, in one Triton kernel: XAttention's estimate after its strided
GEMM. Reads the (bf16) scores twice — once for each row's max and sum, once for the normalised block sums — instead
of materialising fp32 probabilities."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile(base, c0, s_sc, grow, hi, col_lim, off_s, CAUSAL: tl.constexpr, BLOCK_C: tl.constexpr):
    """Scores of columns c0 .. c0+BLOCK_C in the log2 domain, -inf where invalid (past ``col_lim``/``hi`` or, if
    causal, past each row's diagonal)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    valid = (cols[None, :] < col_lim) & (cols[None, :] < hi)
    if CAUSAL:
        valid = valid & (cols[None, :] <= grow[:, None] + off_s)
    return tl.load(base + cols[None, :] * s_sc, mask=valid, other=float("-inf")).to(tl.float32) * 1.4426950408889634


@triton.jit
def _softmax_block_sum(S, OUT, s_sb, s_sr, s_sc, s_ob, s_om, s_on, n_cols, row0, col_lim, off_s,
                       CAUSAL: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BLOCK_C: tl.constexpr):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    rows = rb * BQ + tl.arange(0, BQ)
    grow = row0 + rows  # rows' positions in the whole strided sequence
    base = S + bh * s_sb + rows[:, None] * s_sr
    hi = n_cols
    if CAUSAL:
        hi = tl.minimum(n_cols, row0 + rb * BQ + BQ + off_s)  # no column past the last row's diagonal
    m = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BQ], dtype=tl.float32)
    for c0 in range(0, hi, BLOCK_C):
        s = _tile(base, c0, s_sc, grow, hi, col_lim, off_s, CAUSAL, BLOCK_C)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.math.exp2(m - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m = m_new
    inv = tl.where(l > 0, 1.0 / l, 0.0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    for c0 in range(0, hi, BLOCK_C):
        s = _tile(base, c0, s_sc, grow, hi, col_lim, off_s, CAUSAL, BLOCK_C)
        p = tl.math.exp2(s - m_sub[:, None]) * inv[:, None]
        blk = tl.sum(tl.reshape(tl.sum(p, 0), [BLOCK_C // BK, BK]), 1)
        kb = c0 // BK + tl.arange(0, BLOCK_C // BK)
        tl.store(OUT + bh * s_ob + rb * s_om + kb * s_on, blk, mask=kb * BK < hi)


def softmax_block_sum(scores, rows_per_block: int, cols_per_block: int, row0: int, col_lim: int, off_s: int,
                      causal: bool):
    """scores [BH, R, C] (logits, any float dtype; R a multiple of ``rows_per_block``, C of ``cols_per_block``) ->
    float32 [BH, R / rows_per_block, C / cols_per_block]: per row, softmax over the valid columns (c < ``col_lim`` and,
    if ``causal``, c ≤ row0 + r + ``off_s``), summed over each block of rows and columns."""
    bh, r, c = scores.shape
    out = torch.zeros(bh, r // rows_per_block, c // cols_per_block, dtype=torch.float32, device=scores.device)
    block_c = max(cols_per_block, min(256, triton.next_power_of_2(c)))
    _softmax_block_sum[(bh, r // rows_per_block)](
        scores, out, *scores.stride(), *out.stride(), c, row0, col_lim, off_s,
        CAUSAL=causal, BQ=rows_per_block, BK=cols_per_block, BLOCK_C=block_c,
    )
    return out
