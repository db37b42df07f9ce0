"""Rows of a [B, H, N, D] tensor at per-(batch, head) positions, each row copied whole (Triton): the gather behind
``pbs`` (its keys in permuted order, pooled for the block scores, and K and V in that order for the attention
kernel) and the sequences ``token_sparse`` and ``grid`` gather per head (``ops._attend_gathered``).

``torch.gather(x, 2, index[..., None].expand(..., D))`` computes an address for every element, and ``index_select``
over the flattened rows does no better. Here each program copies ``R`` rows, each row in one vectorised load and
store. Measured on an H200 with bf16 keys, d = 128, on a permutation within 1024-key segments (one process, the
median of two rounds; ``benchmarks/pbs_steps.py`` measures it on pbs's own permutation and saves
``pbs_steps.json``):

==============  ============  ============  ===========
keys            torch.gather  index_select  this kernel
==============  ============  ============  ===========
28 heads, 32K   0.371 ms      0.578 ms      0.119 ms
28 heads, 128K  1.461 ms      2.254 ms      0.459 ms
4 heads, 32K    0.061 ms      0.100 ms      0.022 ms
==============  ============  ============  ===========

32 and 64 rows per program ran alike. The values are x's own (a copy): bit for bit ``torch.gather``'s."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

R, WARPS = 32, 4  # rows per program (32 and 64 rows measured alike), warps


@triton.jit
def _rows(X, IDX, HEADS, OUT, N, M, H, s_xb, s_xh, s_xn, s_xd, s_ib, s_ih, s_im, D: tl.constexpr, BD: tl.constexpr,
          R: tl.constexpr, MAP: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 bases and offsets: 28 heads of 600K keys pass 2^31 elements
    h = (bh % H).to(tl.int64)
    hx = tl.load(HEADS + h).to(tl.int64) if MAP else h
    r = t * R + tl.arange(0, R)
    ok = r < M
    idx = tl.load(IDX + b * s_ib + h * s_ih + r.to(tl.int64) * s_im, mask=ok, other=0).to(tl.int64)
    inside = ok & (idx >= 0) & (idx < N)
    dd = tl.arange(0, BD)
    dm = dd < D
    v = tl.load(X + b * s_xb + hx * s_xh + idx[:, None] * s_xn + dd[None, :] * s_xd, mask=inside[:, None] & dm[None, :],
                other=0.0)
    tl.store(OUT + (bh.to(tl.int64) * M + r)[:, None] * D + dd[None, :], v, mask=ok[:, None] & dm[None, :])


def gather_rows(x: torch.Tensor, index: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, h, m] = x[b, heads[h], index[b, h, m]] -> contiguous [B, H, M, D] in x's dtype. x: [B, Hx, N, D], any
    strides; index: integer [B or 1, H, M], any strides (expanded is fine); heads: integer [H] in [0, Hx), or None
    for heads[h] = h (then H = Hx). A position outside [0, N) gives a row of zeros (``torch.gather`` would stop
    the device with an assertion)."""
    b, hx, n, d = x.shape
    h, m = index.shape[1], index.shape[2]
    if heads is None and h != hx:
        raise ValueError(f"index has {h} heads, x {hx}: pass heads= to map them")
    out = torch.empty(b, h, m, d, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    s_ib = index.stride(0) if index.shape[0] > 1 else 0
    hmap = heads if heads is not None else index  # unread without MAP
    _rows[(triton.cdiv(m, R), b * h)](
        x, index, hmap, out, n, m, h, *x.stride(), s_ib, index.stride(1), index.stride(2),
        D=d, BD=triton.next_power_of_2(d), R=R, MAP=heads is not None, num_warps=WARPS)
    return out
