"""Per-row block selection in one Triton kernel: ``patterns.base.topk_layout``'s forced/causal bias, its top-k and
the ascending order of the kept indices, for one row of pooled block scores per program.

Each score becomes an order-preserving 32-bit integer (forced blocks — sink, diagonal — rank as +inf, blocks past
the causal diagonal as -inf, exactly as the torch path biases them). A 32-step binary search on that integer finds
the row's ``total``-th largest value (each step one count over the row, in registers); the blocks above it, and the
lowest-indexed ones equal to it up to ``total``, are kept and written in ascending order through a prefix sum.
Replaces torch's radix top-k (four passes over the scores), the bias add and the index sort — about 1 ms of
``block_topk``'s 2.2 ms estimation at 128K tokens on an H100 (``benchmarks/profile_estimation.py``). (A first
version ranked each row with an in-register bitonic sort of (score, index) pairs: slower than torch's top-k at 1,024
key blocks.)"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _select(S, IDX, TOTAL, s_sb, s_sh, s_sm, s_ib, s_ih, s_im, H, nkb, width, sink, local, block_q, block_k,
            q_len, off, CAUSAL: tl.constexpr, W: tl.constexpr):
    bh = tl.program_id(0)
    m = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = tl.arange(0, W)
    score = tl.load(S + b * s_sb + h * s_sh + m * s_sm + n, mask=n < nkb, other=float("-inf")).to(tl.float32)
    last_q = tl.minimum((m + 1) * block_q - 1, q_len - 1) + off
    if CAUSAL:
        allowed = (n * block_k <= last_q) & (n < nkb)
        diag = last_q // block_k
    else:
        allowed = n < nkb
        diag = m * block_q // block_k
    forced = ((n < sink) | ((n <= diag) & (n > diag - local))) & allowed
    score = tl.where(forced, float("inf"), tl.where(allowed, score, float("-inf")))
    bits = score.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # float order as signed-integer order
    total = tl.load(TOTAL + m)
    # the largest t with at least `total` keys >= t: the row's total-th largest key
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ge = tl.sum((key >= mid).to(tl.int32), 0) >= total
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid - 1)
    above = key > lo
    tie = key == lo
    room = total - tl.sum(above.to(tl.int32), 0)
    keep = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))  # ties: the lowest block indices
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    row = IDX + b * s_ib + h * s_ih + m * s_im
    tl.store(row + pos, n, mask=keep)
    tl.store(row + n, tl.zeros_like(n), mask=(n >= total) & (n < width))


def select_blocks(scores: torch.Tensor, total: torch.Tensor, width: int, sink: int, local: int, block_q: int,
                  block_k: int, q_len: int, k_len: int, causal: bool) -> torch.Tensor:
    """int32 [B, H, NQ, width]: per row the ``total[m]`` best blocks of ``scores`` [B, H, NQ, NK] (forced sink and
    diagonal blocks first, nothing past the causal diagonal), in ascending order, then zeros."""
    b, h, nqb, nkb = scores.shape
    scores = scores.contiguous()
    out = torch.empty(b, h, nqb, width, dtype=torch.int32, device=scores.device)
    w = triton.next_power_of_2(max(nkb, 2))
    _select[(b * h, nqb)](
        scores, out, total.to(torch.int32).contiguous(), scores.stride(0), scores.stride(1), scores.stride(2),
        out.stride(0), out.stride(1), out.stride(2), h, nkb, width, sink, local, block_q, block_k, q_len,
        k_len - q_len, CAUSAL=causal, W=w, num_warps=4 if w <= 1024 else 8,
    )
    return out
