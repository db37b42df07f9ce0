"""The pyramid's pooled K/V in one pass (Triton): every level of ``layout.POOL_LEVELS`` (means over 2, 4 and 8
consecutive keys) from a single read of the keys.

The pyramid kernels attend a layout's pooled blocks through K and V mean-pooled at each level, stacked along the
sequence (``block_sparse.pool_kv``). The torch version of that step (``layout.pool_levels`` and a ``torch.cat``)
copies the keys to fp32, reads that copy once per level and then copies the levels again into the stacked tensor:
about eight passes over an fp32 tensor twice the keys' size. Its cost grows with the K/V heads, so it weighed most
where K/V are not shared (28 of 28 heads). Here each program reads 8·R consecutive key rows once, sums neighbouring
pairs in fp32 (level 2), pairs of those (level 4) and pairs of those (level 8), and writes each level's rows, scaled
by 1/p and rounded once to the keys' dtype, straight into its place in the stacked output. Wherever the fp32 sums
are exact (they are for bf16 and fp16 keys of similar magnitudes) the result is the torch version's, bit for bit;
otherwise it may differ by one rounding of the dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import POOL_LEVELS

R = 8  # level-8 rows per program: 8·R key rows read
assert POOL_LEVELS == (2, 4, 8), "the kernel writes exactly the levels 2, 4 and 8, in that order"


@triton.jit
def _pair(xp, r, s_xn, dm):
    """Key rows r and r + 1, summed in fp32."""
    return tl.load(xp + r * s_xn, mask=dm).to(tl.float32) + tl.load(xp + (r + 1) * s_xn, mask=dm).to(tl.float32)


@triton.jit
def _pool_levels(X, OUT, HK, s_xb, s_xh, s_xn, s_xd, s_ob, s_oh, s_on, off4, off8, D: tl.constexpr,
                 BD: tl.constexpr, R: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HK).to(tl.int64)  # int64 bases (28 K/V heads of 600K keys pass 2^31 elements), int32 offsets
    h = (bh % HK).to(tl.int64)
    i = tl.arange(0, R)  # this program's level-8 rows, from its first: key rows 8i … 8i+7 past its first key
    dd = tl.arange(0, BD)[None, :]
    dm = dd < D
    xp = X + (b * s_xb + h * s_xh + (t * 8 * R).to(tl.int64) * s_xn) + dd * s_xd
    ob = b * s_ob + h * s_oh  # output rows are addressed from each level's first row of this program
    op2 = OUT + (ob + (t * 4 * R).to(tl.int64) * s_on) + dd
    op4 = OUT + (ob + (off4 + t * 2 * R).to(tl.int64) * s_on) + dd
    op8 = OUT + (ob + (off8 + t * R).to(tl.int64) * s_on) + dd
    r8 = (8 * i)[:, None]
    s2a = _pair(xp, r8, s_xn, dm)
    s2b = _pair(xp, r8 + 2, s_xn, dm)
    s2c = _pair(xp, r8 + 4, s_xn, dm)
    s2d = _pair(xp, r8 + 6, s_xn, dm)
    ty = OUT.dtype.element_ty
    r2 = (4 * i)[:, None]  # level 2 starts at row 0 of the stacked output
    tl.store(op2 + r2 * s_on, (s2a * 0.5).to(ty), mask=dm)
    tl.store(op2 + (r2 + 1) * s_on, (s2b * 0.5).to(ty), mask=dm)
    tl.store(op2 + (r2 + 2) * s_on, (s2c * 0.5).to(ty), mask=dm)
    tl.store(op2 + (r2 + 3) * s_on, (s2d * 0.5).to(ty), mask=dm)
    s4a = s2a + s2b
    s4b = s2c + s2d
    r4 = (2 * i)[:, None]
    tl.store(op4 + r4 * s_on, (s4a * 0.25).to(ty), mask=dm)
    tl.store(op4 + (r4 + 1) * s_on, (s4b * 0.25).to(ty), mask=dm)
    tl.store(op8 + i[:, None] * s_on, ((s4a + s4b) * 0.125).to(ty), mask=dm)


def pool_levels_stacked(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, list[int]]:
    """x [B, Hkv, N, D] mean-pooled over its first ``rows`` keys (a multiple of 8·R, at most N) at levels 2, 4 and 8,
    stacked along the sequence: -> (pooled [B, Hkv, rows/2 + rows/4 + rows/8, D] in x's dtype, each level's first
    row). The levels equal ``layout.pool_levels`` (fp32 means, rounded once) wherever the fp32 sums are exact."""
    b, hk, n, d = x.shape
    if rows % (8 * R) or rows > n:
        raise ValueError(f"pool_levels_stacked: {rows} rows of {n} (a multiple of {8 * R} needed)")
    offs = [0, rows // 2, rows // 2 + rows // 4]
    out = torch.empty(b, hk, offs[2] + rows // 8, d, dtype=x.dtype, device=x.device)
    if rows == 0 or b * hk == 0:
        return out, offs
    _pool_levels[(rows // (8 * R), b * hk)](x, out, hk, *x.stride(), out.stride(0), out.stride(1), out.stride(2),
                                            offs[1], offs[2], D=d, BD=triton.next_power_of_2(d), R=R, num_warps=4)
    return out, offs
