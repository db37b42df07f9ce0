"""``block_topk``'s query pooling, pooled scores and block selection in one Triton kernel, for layouts up to
``UP_TO`` key blocks wide (16K tokens in 128-token blocks).

At 16K tokens ``block_topk``'s estimate is five short launches — q's pooled sum and its scaling, k's pooled mean, the
TF32×3 product (``pooled_scores``), the per-row selection (``block_select._select``) — and in a CUDA graph the
gaps between them cost about half as much as the kernels: 0.034 ms of GPU time against 0.023 ms of kernel time at
28/4 heads on an H200, where the attention kernel on the 5% layout takes 0.25–0.36 ms. Here one program owns ``BM``
rows of one K/V head (its query heads' query blocks, consecutive as in ``pooled_scores``) and

1. pools their queries: the sum of the sampled tokens of each block (every ``stride``-th, as
   ``patterns.base.pool_blocks``; ``TOKENS`` of them per row in one load) in fp32, times ``scale / count`` (1/√D
   over the tokens pooled, fewer in a partial last block), one head-dim slice at a time;
2. multiplies each slice by the same slice of the K/V head's pooled keys (``_pool_keys``, below) in TF32×3,
   as ``pooled_scores`` does, into a [BM, W] score tile that stays in registers;
3. selects each row's ``total`` blocks as ``block_select._select`` does (forced sink and diagonal blocks at +inf,
   nothing past the diagonal, ties to the lower index): one round of two max/min-reductions per pick when every row
   of the tile picks at most ``block_select.FEW`` blocks beyond the forced ones, else the 32-step search on the
   order-preserving integers, for all rows of the tile at once;
4. writes the layout (ascending indices, counts, ``kv_full``).

The scores equal the unfused path's wherever the fp32 sums are exact (the order of the additions differs), and so
does the layout (``tests/test_attention.py`` checks it on dyadic q/k in the interpreter; the GPU test compares it with
the unfused kernels on random q/k, allowing only rows whose deciding scores are within fp32 rounding).

Measured on an H200 (``benchmarks/profile_estimation.py --n 16384 --specs "block_topk:density=0.05;block_topk:
density=0.1" --env-ab VIDSPARSE_TOPK_FUSED=0,1``, GPU ms of the whole estimate, ``profile_estimation_s116_*.json``):
at 16K, 5% 0.0343 → 0.0314 (28/4 heads) and 0.0385 → 0.0361 (28/28), 10% 0.0367 → 0.0352 and 0.0406 → 0.0400. The
kernel takes 0.017 ms of that at 5% and 0.022 ms at 10% (28/4): each program's steps — the loads, the product, a
round of cross-warp reductions per pick, the prefix sum — run one after the other, and 112 programs leave most of
the GPU idle. At 32K (256 key blocks, 16 rows per program) it was twice as slow as the unfused kernels (5%: 0.063
→ 0.126 ms, 28/4), so ``UP_TO`` stops at 128. Launches (same runs, 16K, 5%, 28/4): 32 rows per program 0.0315 ms
against 0.0351 with 16; 8 warps 0.0317 against 0.0586 with 4 and 0.0374 with 16; and (``profile_estimation_s117_
{slice,tokens}_*.json``, 28/4 and 28/28) 64-column head-dim slices 0.0298 / 0.0341 ms against 0.0397 / 0.0437 with
32, all 16 pooled tokens in one load 0.0296 / 0.0340 against 0.0301 / 0.0348 in two of 8. That last build keeps 8
bytes on the stack at 28/28 heads (255 registers; none with 8 tokens per load), faster all the same. The first
version loaded one pooled token per step (16 dependent loads per head-dim slice): 0.0376 ms, slower than the
unfused kernels (``profile_estimation_s115_*.json``). Tried and dropped: each round as one int64 max-reduction of
(key, lower index first) packed, as ``block_select._top_few`` does, instead of an int32 max and a min of the index:
level (5%: 0.0296 / 0.0299 ms, 28/4; 0.0337 / 0.0338, 28/28; ``profile_estimation_s118_packed_*.json``).

The keys are pooled by ``_pool_keys`` (``pool_blocks``'s means, ``KEY_BLOCKS``+ blocks of one K/V head per
program), and on Hopper and newer (``pdl``) ``_pooled_topk`` is launched dependent on it (programmatic dependent
launch): ``_pool_keys`` lets it start at once (``griddepcontrol.launch_dependents``), so its programs pool their
queries while the keys are pooled and wait (``griddepcontrol.wait``, ``_primary_done``) only before they load the
pooled keys. Nothing may run between the two launches: the selection reads q and ``total`` before that wait, which
is safe only because they were complete before ``_pool_keys`` started. Measured on an H200 (``--env-ab
VIDSPARSE_TOPK_KEYS=torch,kernel,pdl``, the keys pooled by torch's mean, by ``_pool_keys`` launched plainly, and
dependent; 16 tokens per block, 5%, ``profile_estimation_s120_keys_*.json``): 16K 0.0297 / 0.0282 / 0.0262 ms
(28/4), 0.0340 / 0.0342 / 0.0319 (28/28); 8K 28/28 0.0223 / 0.0230 / 0.0201. ``block_topk``'s default of 8
tokens per block (16 before) then took 16K 5% to 0.0221 ms (28/4) and 0.0266 (28/28) (``s120_stride_*``); blocks
per key-pooling program by ``key_blocks`` (``s121_kb_*``, 5%, 8 tokens): 4 / 8 / 16 0.0219 / 0.0241 / 0.0232 ms
(28/4, the rule's 4), 0.0267 / 0.0259 / 0.0251 (28/28, the rule's 16)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from . import fit
from .block_select import FEW, _emit_rows, _geometry, _order_key, _outputs, _top_few_rows, _top_rows

UP_TO = 128  # key blocks: wider layouts keep the unfused kernels (slower fused at 256: see above)
BM = 32  # rows per program (VIDSPARSE_POOLED_TOPK_BM): 112 programs at 16K for 28/4 and 28/28 heads
WARPS = 8  # (VIDSPARSE_POOLED_TOPK_WARPS)
TOKENS = 16  # pooled tokens per row loaded at once (all of them at the default 8 per block, or 16); half with search
SLICE_ENTRIES = 8192  # the pooled keys' [head-dim slice, W] tile per product step: 64 columns at W = 128
KEY_BLOCKS = 4  # the fewest key blocks per ``_pool_keys`` program (``key_blocks``)
KEY_PROGRAMS_PER_SM = 2  # ``key_blocks`` doubles the blocks per program until the programs are at most this per SM
KEY_TOKENS = 16  # pooled tokens per key block loaded at once
KEY_WARPS = 4


@triton.jit
def _primary_done():
    """``griddepcontrol.wait``: returns (0) once the kernel this one was launched dependent on has finished and its
    writes are visible. The loads that need them add the 0 to their addresses, so no compiler can move them above the
    wait."""
    return tl.inline_asm_elementwise("griddepcontrol.wait;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _pool_keys(K, KP, s_kb, s_kh, s_kn, s_kd, HK, nk, nkb, d, block_k, stride, f_full, f_last,
               T: tl.constexpr, TT: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, PDL: tl.constexpr):
    """``patterns.base.pool_blocks(k, block_k, stride=stride)`` into the contiguous float32 [B, Hkv, NK, D] KP: the
    sum of each block's sampled tokens in fp32 times 1 / their count (``f_last`` in a partial last block), ``KB``
    blocks of one K/V head per program. With ``PDL`` it lets the dependent launch start at once."""
    if PDL:
        gdc_launch_dependents()
    bk = tl.program_id(0)
    j = tl.program_id(1) * KB + tl.arange(0, KB)  # key blocks
    dd = tl.arange(0, D)
    rows = K + (bk // HK).to(tl.int64) * s_kb + (bk % HK).to(tl.int64) * s_kh
    acc = tl.zeros([KB, D], dtype=tl.float32)
    for t0 in range(0, T, TT):
        t = t0 + tl.arange(0, TT)[None, :]
        tok = j[:, None] * block_k + t * stride  # [KB, TT]
        ok = (j[:, None] < nkb) & (tok < nk) & (t < T)
        x = tl.load(rows + tok.to(tl.int64)[:, :, None] * s_kn + dd[None, None, :] * s_kd,
                    mask=ok[:, :, None] & (dd < d)[None, None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 1)
    f = tl.where((j + 1) * block_k > nk, f_last, f_full)
    out = KP + (bk.to(tl.int64) * nkb + j[:, None]) * d + dd[None, :]
    tl.store(out, acc * f[:, None], mask=(j < nkb)[:, None] & (dd < d)[None, :])


@triton.jit
def _pooled_topk(Q, KP, TOTAL, IDX, FULL, CNT, s_qb, s_qh, s_qn, s_qd, H, HK, G, NQB, nkb, width, sink, local,
                 block_q, block_k, q_len, off, stride, f_full, f_last, few,
                 T: tl.constexpr, TT: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                 W: tl.constexpr, CAUSAL: tl.constexpr, ROUNDS: tl.constexpr, PDL: tl.constexpr):
    bk = tl.program_id(0)  # batch · K/V head
    b = bk // HK
    r = tl.program_id(1) * BM + tl.arange(0, BM)  # rows over the G · NQB query blocks of this K/V head
    live = r < G * NQB
    m = r % NQB
    h = (bk % HK) * G + r // NQB  # the row's query head
    q_rows = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh  # [BM] pointers
    f = tl.where((m + 1) * block_q > q_len, f_last, f_full)  # scale / tokens pooled (fewer in a partial last block)
    n = tl.arange(0, W)
    kp = KP + bk.to(tl.int64) * nkb * D
    s = tl.zeros([BM, W], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BK):  # one head-dim slice at a time: its pooled queries, then its product
        dd = k0 + tl.arange(0, BK)
        acc = tl.zeros([BM, BK], dtype=tl.float32)
        for t0 in range(0, T, TT):  # TT pooled tokens of each row in one load: one memory round trip, not TT
            t = t0 + tl.arange(0, TT)[None, :]
            tok = m[:, None] * block_q + t * stride  # [BM, TT]
            ok = live[:, None] & (tok < q_len) & (t < T)
            x = tl.load(q_rows[:, None, None] + tok.to(tl.int64)[:, :, None] * s_qn + dd[None, None, :] * s_qd,
                        mask=ok[:, :, None], other=0.0)
            acc += tl.sum(x.to(tl.float32), 1)
        ready = 0
        if PDL:  # launched dependent on ``_pool_keys``: its pooled keys are complete and visible from here on
            ready = _primary_done()
        kt = tl.load(kp + ready + n[None, :] * D + dd[:, None], mask=n[None, :] < nkb, other=0.0)
        s = tl.dot(acc * f[:, None], kt, s, input_precision="tf32x3")
    mm = m[:, None]  # the rows as [BM, 1], the blocks as [1, W]: ``block_select``'s row-tile helpers
    nn = n[None, :]
    ok = live[:, None]
    allowed, forced, full = _geometry(mm, nn, nkb, sink, local, block_q, block_k, q_len, off, CAUSAL)
    key = _order_key(tl.where(forced, float("inf"), tl.where(allowed, s, float("-inf"))))
    total = tl.load(TOTAL + mm, mask=ok, other=0)
    picks = tl.where(ok, total - tl.sum(forced.to(tl.int32), 1, keep_dims=True), 0)  # the total covers the forced
    if ROUNDS or tl.max(picks) <= few:
        keep = _top_few_rows(key, nn, forced, picks, total, W)
    else:
        keep = _top_rows(key, total)
    out = ((b * H + h).to(tl.int64) * NQB + m)[:, None]  # the row in the contiguous [B, H, NQ] outputs
    tl.store(CNT + out, _emit_rows(keep, full, nn, IDX + out * width, FULL + out * width, width, ok), mask=ok)


def fits(nkb: int, d: int) -> bool:
    """Whether ``pooled_topk`` takes a layout: up to ``UP_TO`` key blocks, a power-of-two head dim of at least 16."""
    return nkb <= UP_TO and d >= 16 and d & (d - 1) == 0


def pooled_topk(q: torch.Tensor, k: torch.Tensor, total: torch.Tensor, width: int, sink: int, local: int,
                block_q: int, block_k: int, causal: bool, q_stride: int, k_stride: int, kp: torch.Tensor | None = None,
                pdl: bool | None = None):
    """``topk_layout(block_scores(q, k, ...), ...)``'s layout with q's pooling in the same kernel: q [B, H, Nq, D]
    and k [B, Hkv, Nk, D] (any strides, 16- or 32-bit; H a multiple of Hkv), ``total`` int [NQ] the blocks per row
    (``row_totals``), ``q_stride`` and ``k_stride`` the poolings' (every ``stride``-th token of each block, as
    ``pool_blocks``) -> (index int32 [B, H, NQ, width] ascending then zeros, count int32 [B, H, NQ], full bool
    [B, H, NQ, width]). The keys are pooled by ``_pool_keys`` unless ``kp`` (float32 [B, Hkv, NK, D], as
    ``pool_blocks`` pools them) is given. ``pdl``: launch the selection dependent on the key pooling
    (programmatic dependent launch), so that it pools q while the keys are pooled; None: where it runs, on CUDA
    at compute capability 9.0 or newer."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    if h % hk or k.shape[0] != b or k.shape[-1] != d or not fits(nkb, d) or \
            (kp is not None and tuple(kp.shape) != (b, hk, nkb, d)):
        raise ValueError(f"pooled_topk: q {tuple(q.shape)}, k {tuple(k.shape)}"
                         + (f", kp {tuple(kp.shape)}" if kp is not None else "") + f" (at most {UP_TO} key blocks)")
    total = total.to(torch.int32).contiguous()  # before the key pooling: nothing may run between the two launches
    index, full, count = _outputs(b, h, nqb, width, q.device)
    if count.numel() == 0:
        return index, count, full
    if pdl is None:
        pdl = q.is_cuda and fit.capability(q.device)[0] >= 9
    tail = nq - (nqb - 1) * block_q
    scale = 1.0 / d ** 0.5
    f_full = fit.f32(scale / -(-block_q // q_stride))
    f_last = fit.f32(scale / -(-tail // q_stride))
    if kp is None:
        kp = pool_keys(k, block_k, k_stride, pdl)
    else:
        kp, pdl = kp.float().contiguous(), False
    w = triton.next_power_of_2(max(nkb, 16))
    bm = fit.env_int("VIDSPARSE_POOLED_TOPK_BM", BM, minimum=16, pow2=True)
    warps = fit.env_int("VIDSPARSE_POOLED_TOPK_WARPS", WARPS, pow2=True)
    g = h // hk
    few = fit.env_int("VIDSPARSE_SELECT_FEW", FEW, minimum=0)
    t = -(-block_q // q_stride)  # tokens pooled per block
    rounds = width <= few
    tokens = fit.env_int("VIDSPARSE_POOLED_TOPK_TOKENS", TOKENS, minimum=2, pow2=True)
    tt = min(triton.next_power_of_2(t), tokens if rounds else tokens // 2)  # the search needs more registers
    entries = fit.env_int("VIDSPARSE_POOLED_TOPK_SLICE", SLICE_ENTRIES, minimum=16, pow2=True)
    _pooled_topk[(b * hk, triton.cdiv(g * nqb, bm))](
        q, kp, total, index, full, count, *q.stride(), h, hk, g, nqb, nkb, width, sink, local, block_q, block_k,
        nq, nk - nq, q_stride, f_full, f_last, few, T=t, TT=tt, D=d,
        BK=max(16, min(d, entries // w)), BM=bm, W=w, CAUSAL=causal, ROUNDS=rounds, PDL=pdl,
        num_warps=warps, launch_pdl=pdl)
    return index, count, full


def pool_keys(k: torch.Tensor, block: int, stride: int, pdl: bool = False) -> torch.Tensor:
    """``patterns.base.pool_blocks(k, block, stride=stride)`` in one Triton launch (``_pool_keys``): k [B, Hkv, N, D]
    (any strides, 16- or 32-bit) -> float32 [B, Hkv, ceil(N / block), D], the same bits wherever the fp32 sums are
    exact. ``pdl``: the kernel lets a dependent launch start before it finishes (``pooled_topk``'s)."""
    b, hk, nk, d = k.shape
    nkb = -(-nk // block)
    kp = torch.empty(b, hk, nkb, d, dtype=torch.float32, device=k.device)
    if kp.numel() == 0:
        return kp
    t = -(-block // stride)  # tokens pooled per block
    kb = key_blocks(b * hk, nkb, k.device)
    tt = min(triton.next_power_of_2(t), KEY_TOKENS)
    _pool_keys[(b * hk, triton.cdiv(nkb, kb))](
        k, kp, *k.stride(), hk, nk, nkb, d, block, stride, fit.f32(1.0 / t),
        fit.f32(1.0 / -(-(nk - (nkb - 1) * block) // stride)),
        T=t, TT=tt, D=triton.next_power_of_2(d), KB=kb, PDL=pdl, num_warps=KEY_WARPS)
    return kp


def key_blocks(heads: int, nkb: int, device) -> int:
    """Key blocks per ``_pool_keys`` program: ``KEY_BLOCKS``, doubled while the programs (``heads`` × the key blocks
    over this) would be more than ``KEY_PROGRAMS_PER_SM`` per SM. ``VIDSPARSE_POOL_KEYS_BLOCKS=N`` fixes N (0: this
    rule)."""
    fixed = fit.env_int("VIDSPARSE_POOL_KEYS_BLOCKS", 0, minimum=0, pow2=True)
    if fixed:
        return fixed
    sms = fit.sm_count(device)
    kb = KEY_BLOCKS
    while kb < nkb and heads * -(-nkb // kb) > KEY_PROGRAMS_PER_SM * sms:
        kb *= 2
    return kb
