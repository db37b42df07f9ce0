"""Rows of a [B, H, N, D] tensor at per-(batch, head) positions, each row copied whole (Triton): the gather behind
``pbs`` (its keys in permuted order, pooled for the block scores, and K and V in that order for the attention
kernel) and the sequences ``token_sparse`` and ``grid`` gather per head (``ops._attend_gathered``), and its inverse
``scatter_rows``, which writes those sequences' output rows back to their positions.

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

from . import fit
from .block_select import _order_key

R, WARPS = 32, 4  # rows per program (32 and 64 rows measured alike), warps


@triton.jit
def _plane(HEADS, b, h, HX, MAP: tl.constexpr):
    """The (batch, head) of the [B, Hx, N, D] tensor that this program's index head ``h`` (batch ``b``) addresses:
    its own (MAP 0), heads[h] (MAP 1), or divmod(planes[h], Hx) (MAP 2: flattened planes, the index has batch 1)."""
    if MAP == 2:
        plane = tl.load(HEADS + h).to(tl.int64)
        xb = plane // HX
        xh = plane % HX
    elif MAP == 1:
        xb = b
        xh = tl.load(HEADS + h).to(tl.int64)
    else:
        xb = b
        xh = h
    return xb, xh


@triton.jit
def _rows(X, IDX, HEADS, OUT, N, M, H, HX, s_xb, s_xh, s_xn, s_xd, s_ib, s_ih, s_im, D: tl.constexpr,
          BD: tl.constexpr, R: tl.constexpr, MAP: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 bases and offsets: 28 heads of 600K keys pass 2^31 elements
    h = (bh % H).to(tl.int64)
    xb, hx = _plane(HEADS, b, h, HX, MAP)
    r = t * R + tl.arange(0, R)
    ok = r < M
    idx = tl.load(IDX + b * s_ib + h * s_ih + r.to(tl.int64) * s_im, mask=ok, other=0).to(tl.int64)
    inside = ok & (idx >= 0) & (idx < N)
    dd = tl.arange(0, BD)
    dm = dd < D
    v = tl.load(X + xb * s_xb + hx * s_xh + idx[:, None] * s_xn + dd[None, :] * s_xd,
                mask=inside[:, None] & dm[None, :], other=0.0)
    tl.store(OUT + (bh.to(tl.int64) * M + r)[:, None] * D + dd[None, :], v, mask=ok[:, None] & dm[None, :])


def gather_rows(x: torch.Tensor, index: torch.Tensor, heads: torch.Tensor | None = None,
                planes: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, h, m] = x[b, heads[h], index[b, h, m]] -> contiguous [B, H, M, D] in x's dtype. x: [B, Hx, N, D], any
    strides; index: integer [B or 1, H, M], any strides (expanded is fine); heads: integer [H] in [0, Hx), or None
    for heads[h] = h (then H = Hx). ``planes`` instead of ``heads``: integer [H] in [0, B·Hx), each output head
    reading x's plane (b, h) = divmod(planes[h], Hx), with a batch-1 index and out [1, H, M, D] — the flattened
    x.reshape(B·Hx, N, D) without its copy where x's strides do not merge (a [B, N, H, D] projection with B > 1).
    A position outside [0, N) gives a row of zeros (``torch.gather`` would stop the device with an assertion)."""
    b, hx, n, d = x.shape
    h, m = index.shape[1], index.shape[2]
    if planes is not None:
        _check_planes(index, planes, heads)
        b = 1
    elif heads is None and h != hx:
        raise ValueError(f"index has {h} heads, x {hx}: pass heads= to map them")
    out = torch.empty(b, h, m, d, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    s_ib = index.stride(0) if index.shape[0] > 1 else 0
    hmap = planes if planes is not None else heads if heads is not None else index  # unread without MAP
    _rows[(triton.cdiv(m, R), b * h)](
        x, index, hmap, out, n, m, h, hx, *x.stride(), s_ib, index.stride(1), index.stride(2),
        D=d, BD=triton.next_power_of_2(d), R=R, MAP=2 if planes is not None else int(heads is not None),
        num_warps=WARPS)
    return out


@triton.jit
def _rows_qkv(Q, K, V, IDX, QP, KP, QO, KO, VO, N, M, HQ, HK, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb,
              s_vh, s_vn, s_vd, s_ih, s_im, D: tl.constexpr, BD: tl.constexpr, R: tl.constexpr):
    """``_rows`` over flattened planes for q, k and v at one index: program axis 2 picks the tensor."""
    t = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)
    r = t * R + tl.arange(0, R)
    ok = r < M
    idx = tl.load(IDX + p * s_ih + r.to(tl.int64) * s_im, mask=ok, other=0).to(tl.int64)
    inside = ok & (idx >= 0) & (idx < N)
    dd = tl.arange(0, BD)
    dm = dd < D
    if which == 0:
        xb, xh = _plane(QP, 0, p, HQ, 2)
        src = Q + xb * s_qb + xh * s_qh + idx[:, None] * s_qn + dd[None, :] * s_qd
        dst = QO
    elif which == 1:
        xb, xh = _plane(KP, 0, p, HK, 2)
        src = K + xb * s_kb + xh * s_kh + idx[:, None] * s_kn + dd[None, :] * s_kd
        dst = KO
    else:
        xb, xh = _plane(KP, 0, p, HK, 2)
        src = V + xb * s_vb + xh * s_vh + idx[:, None] * s_vn + dd[None, :] * s_vd
        dst = VO
    v = tl.load(src, mask=inside[:, None] & dm[None, :], other=0.0)
    tl.store(dst + (p * M + r)[:, None] * D + dd[None, :], v, mask=ok[:, None] & dm[None, :])


def gather_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, q_planes: torch.Tensor,
               kv_planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gather_rows(q, index, planes=q_planes)``, ``gather_rows(k, index, planes=kv_planes)`` and the same for v,
    in one launch (a token layout's sequences gather all three at the same positions; two launches fewer, which the
    host issues after its sync): q [B, H, N, D], k and v [B, Hkv, N, D] (any strides), index integer [1, P, M] ->
    three contiguous [1, P, M, D]. ``token_sparse``'s call at 16K tokens (video q/k, 28/28 heads, H200): its
    kernels 0.672 → 0.666 ms, 20 calls 1.115 → 0.997 ms each on the host's clock in two sessions
    (``profile_estimation_s13{0,2}_host_prof.log``: 20 calls timed back to back and under cProfile, as
    ``benchmarks/host_overhead.py`` now times them); launched through ``do_bench`` the same unchanged ``grid`` call
    moved by 1 ms between processes there, so no launched figure resolves the saving."""
    _check_planes(index, q_planes)
    _check_planes(index, kv_planes)
    b, hq, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != n or k.shape[3] != d or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"gather_qkv: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v "
                         f"{tuple(v.shape)} {v.dtype} do not match")
    p, m = index.shape[1], index.shape[2]
    outs = tuple(torch.empty(1, p, m, d, device=q.device, dtype=q.dtype) for _ in range(3))
    if p * m * d == 0:
        return outs
    _rows_qkv[(triton.cdiv(m, R), p, 3)](
        q, k, v, index, q_planes, kv_planes, *outs, n, m, hq, k.shape[1], *q.stride(), *k.stride(), *v.stride(),
        index.stride(1), index.stride(2), D=d, BD=triton.next_power_of_2(d), R=R, num_warps=WARPS)
    return outs


@triton.jit
def _scatter(OUT, IDX, HEADS, SRC, N, M, H, HX, s_ob, s_oh, s_on, s_od, s_ib, s_ih, s_im, D: tl.constexpr,
             BD: tl.constexpr, R: tl.constexpr, MAP: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    ob, oh = _plane(HEADS, b, h, HX, MAP)
    r = t * R + tl.arange(0, R)
    ok = r < M
    idx = tl.load(IDX + b * s_ib + h * s_ih + r.to(tl.int64) * s_im, mask=ok, other=-1).to(tl.int64)
    inside = ok & (idx >= 0) & (idx < N)
    dd = tl.arange(0, BD)
    dm = dd < D
    v = tl.load(SRC + (bh.to(tl.int64) * M + r)[:, None] * D + dd[None, :], mask=inside[:, None] & dm[None, :])
    tl.store(OUT + ob * s_ob + oh * s_oh + idx[:, None] * s_on + dd[None, :] * s_od, v,
             mask=inside[:, None] & dm[None, :])


def scatter_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor,
                 planes: torch.Tensor | None = None) -> torch.Tensor:
    """``gather_rows``' inverse, in place: out[b, h, index[b, h, m]] = src[b, h, m], or with ``planes`` (int [P] in
    [0, B·Hx)) out[divmod(planes[p], Hx), index[0, p, m]] = src[0, p, m]. out: [B, Hx, N, D], any strides; index:
    integer [B or 1, Hx, M] ([1, P, M] with planes), any strides; src: [B, Hx, M, D] ([1, P, M, D]) in out's dtype,
    made contiguous. Positions outside [0, N) (padding) write nothing; a position listed twice for one plane gets
    one of its rows. Returns out."""
    b, hx, n, d = out.shape
    if planes is not None:
        _check_planes(index, planes)
        bi, h = 1, index.shape[1]
    else:
        if index.shape[1] != hx:
            raise ValueError(f"index has {index.shape[1]} heads, out {hx}")
        bi, h = b, hx
    m = index.shape[2]
    if tuple(src.shape) != (bi, h, m, d) or src.dtype != out.dtype:
        raise ValueError(f"src {tuple(src.shape)} {src.dtype}: expected {(bi, h, m, d)} {out.dtype}")
    if bi * h * m == 0:
        return out
    src = src.contiguous()
    s_ib = index.stride(0) if index.shape[0] > 1 else 0
    _scatter[(triton.cdiv(m, R), bi * h)](
        out, index, planes if planes is not None else index, src, n, m, h, hx, *out.stride(), s_ib, index.stride(1),
        index.stride(2), D=d, BD=triton.next_power_of_2(d), R=R, MAP=2 if planes is not None else 0,
        num_warps=WARPS)
    return out


def _check_planes(index: torch.Tensor, planes: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """``planes=`` takes a batch-1 index, one plane per index head, and no ``heads=``."""
    if heads is not None or index.shape[0] != 1 or planes.shape != (index.shape[1],):
        raise ValueError(f"planes= takes a batch-1 index and one plane per index head, without heads=: index "
                         f"{tuple(index.shape)}, planes {tuple(planes.shape)}")


@triton.jit
def _pool_rows(X, IDX, OUT, N, M, NB, H, s_xb, s_xh, s_xn, s_xd, s_ib, s_ih, s_im, f_full, f_last,
               BLOCK: tl.constexpr, BP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    j = tl.program_id(0)  # the output block
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    r = j * BLOCK + tl.arange(0, BP)  # index entries j·BLOCK … j·BLOCK + BLOCK − 1 (BP: BLOCK padded to 2^k)
    ok = (r < M) & (tl.arange(0, BP) < BLOCK)
    idx = tl.load(IDX + b * s_ib + h * s_ih + r.to(tl.int64) * s_im, mask=ok, other=0).to(tl.int64)
    inside = ok & (idx >= 0) & (idx < N)
    dd = tl.arange(0, BD)
    v = tl.load(X + b * s_xb + h * s_xh + idx[:, None] * s_xn + dd[None, :] * s_xd,
                mask=inside[:, None] & (dd[None, :] < D), other=0.0)
    f = tl.where((j + 1) * BLOCK <= M, f_full, f_last)
    tl.store(OUT + (bh.to(tl.int64) * NB + j) * D + dd, tl.sum(v.to(tl.float32), 0) * f, mask=dd < D)


def pool_rows(x: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """``patterns.base.pool_blocks(gather_rows(x, index), block)`` without the gathered copy: x [B, H, N, D] (any
    strides), index integer [B, H, M] -> float32 [B, H, ceil(M / block), D], the mean of each ``block`` consecutive
    index entries' rows (fewer in a partial last block), summed in fp32 and scaled by 1/count as the torch path's
    mean is (the Python float rounded to fp32). Equal to it wherever the fp32 sums are exact (the order of the
    additions differs). ``pbs`` pools its permuted keys so: the copy is B·H·M·D elements written and read again.

    At 16K tokens and 28/28 heads the copy is 117 MB written and read back. H200, ``pbs``'s whole estimate with
    the copy / without it (``benchmarks/profile_estimation.py --n 16384 --kv-heads 28 --specs pbs --env-ab
    VIDSPARSE_PBS_POOL_ROWS=0,1``, 2026-11-29): 0.368 / 0.322 ms at 28/28 heads, 0.257 / 0.250 ms at 28/4."""
    b, h, n, d = x.shape
    m = index.shape[2]
    if index.shape[:2] != (b, h):
        raise ValueError(f"pool_rows: index {tuple(index.shape)} for x {tuple(x.shape)}")
    nb = -(-m // block)
    out = torch.empty(b, h, nb, d, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    tail = m - (nb - 1) * block
    f_full, f_last = fit.f32(1.0 / block), fit.f32(1.0 / tail)
    bp = triton.next_power_of_2(block)
    _pool_rows[(nb, b * h)](x, index, out, n, m, nb, h, *x.stride(), index.stride(0), index.stride(1),
                            index.stride(2), f_full, f_last, BLOCK=block, BP=bp, D=d, BD=triton.next_power_of_2(d),
                            num_warps=4 if bp * d <= 8192 else 8)
    return out


@triton.jit
def _segment_sort(S, OUT, N, SEG, SP: tl.constexpr):
    g = tl.program_id(0)  # the segment
    row = tl.program_id(1).to(tl.int64)  # the (batch, head) row of scores
    i = tl.arange(0, SP)
    pos = g * SEG + i
    ok = (i < SEG) & (pos < N)
    v = tl.load(S + row * N + pos, mask=ok, other=float("-inf"))  # padding sorts last, as the torch path pads
    packed = (_order_key(v).to(tl.int64) << 32) | (SP - 1 - i).to(tl.int64)  # larger score first, then lower index
    srt = tl.sort(packed, 0, descending=True)
    first = (SP - 1 - (srt & 0xFFFFFFFF)).to(tl.int64)
    tl.store(OUT + row * N + pos, g * SEG + first, mask=ok)


SORT_UP_TO = 8192  # ``segment_order``'s segments up to this long sort in one program each


def segment_order(score: torch.Tensor, segment: int) -> torch.Tensor:
    """``patterns.pbs.segment_order`` in one launch: score float [..., N] -> int64 [..., N], the positions of each
    ``segment``-long run by score descending within the run, ties to the lower position (one program per run: a
    bitonic sort, ``tl.sort``, of (score, position) packed in an int64), runs in order; segments up to
    ``SORT_UP_TO``. Exactly the torch path's order (scores compare as torch compares them: -0.0 equal to 0.0; no
    NaN).

    H200, ``pbs``'s whole estimate with torch's radix sort of the runs / this kernel (``benchmarks/
    profile_estimation.py --n 16384 --kv-heads 4 --specs pbs --env-ab VIDSPARSE_PBS_SORT=0,1``, 2026-11-29):
    0.269 / 0.250 ms at 28/4 heads, 0.325 / 0.322 ms at 28/28 (0.033 ms in ``_segment_sort`` there)."""
    n = score.shape[-1]
    segment = max(1, min(segment, n))
    if segment > SORT_UP_TO:
        raise ValueError(f"segment_order: segments of {segment} (at most {SORT_UP_TO})")
    flat = score.float().reshape(-1, n).contiguous()
    out = torch.empty(flat.shape, dtype=torch.int64, device=score.device)
    if out.numel() == 0:
        return out.view(score.shape)
    sp = triton.next_power_of_2(segment)
    _segment_sort[(triton.cdiv(n, segment), flat.shape[0])](flat, out, n, segment, SP=sp, num_warps=max(4, sp // 256))
    return out.view(score.shape)
