"""Pooled block scores on the tensor cores: what ``block_topk``, ``pyramid`` and ``pbs`` rank key blocks by.

``patterns.base.block_scores`` is pooled(Q)·pooled(K)ᵀ/√D per (query block, key block). The pooling stays a torch
sum reduction (read once, fp32 accumulation); the product of the pooled fp32 tensors is the part torch runs slowly:
cuBLAS computes fp32 GEMMs on the CUDA cores (FFMA; torch leaves TF32 off for fp32 products). ``_scores`` computes
it per (batch·KV head, tile of query rows, tile of key blocks) on the tensor cores in TF32×3 (each fp32 operand split
into a TF32 high and low part, three products: about fp32 accuracy, against TF32's 2⁻¹¹ relative), stored fp32
[B, H, NQ, NK]. GQA: a KV head's query heads are consecutive rows of the pooled queries, so one tile spans them and
the keys are never expanded.

Measured on an H200, 28/4 heads, d = 128, in the same process (``benchmarks/profile_estimation.py --with-kernel``,
``profile_estimation_share_*.json``): the product takes 0.010 / 0.037 / 0.135 ms at 32K / 64K / 128K tokens against
cuBLAS's 0.017 / 0.063 / 0.198 ms. Launch configurations (``--env-ab VIDSPARSE_SCORES_CONFIG=...``,
``profile_estimation_scores_*.json``; ``block_topk``'s whole estimate at 128K): 128×128 tiles, the whole head dim
per step, 8 warps 0.727 ms; 64×64, steps of 32, 4 warps 0.779 ms; plain TF32 0.674 ms (not taken: its 2⁻¹¹
rounding can reorder near-equal blocks against the fp32 and CPU paths, not measured); IEEE fp32 on the CUDA cores
1.87 ms. A Triton pooling kernel (one program per block, any strides) was measured too and dropped: 0.303 ms at
128K against 0.280 ms for torch's two reductions (``profile_estimation_share_131072_poolkernel.json`` against
``profile_estimation_share_131072.json``, separate processes). So was, on an H200, one launch pooling both q and k
at the patterns' stride (branch ``tried-2026-11-29``, commit bb1d7e3, switched by ``VIDSPARSE_POOL_PAIR``; one
program per 64 token rows, a single load, reduction and store; in one process, GPU ms of the whole estimate,
``profile_estimation_s110_pool_*.json``): ``block_topk`` at 5% 0.0382 → 0.0457 ms at 16K and 0.680 → 0.781 at 128K,
``pyramid`` 0.0669 → 0.0742 and 1.652 → 1.753, ``block_cdf`` (the exact mean) 0.0825 → 0.0892 and 1.092 → 1.182; the
kernel took 0.023 ms at 16K where torch's four launches take about 0.012. Nor did fusing q's pooling into this
product pay (commit 8223304: one kernel reading q once, summing 16 query blocks per program in fp32, then the
TF32×3 product on HMMA; ``profile_estimation_poolfused_*.json``, in-process A/B of ``block_topk`` 5%): 0.121 against
0.122 ms at 32K, 0.730 against 0.693 ms at 128K (the best of four fused launch configurations at both sizes: 16
blocks, 8 tokens per step, 3 stages, 4 warps, 64-block product tiles). Up to 128 key blocks (16K tokens), where the
launches cost as much as the kernels, ``block_topk`` does take q's pooling, this product and its selection in one
kernel (``kernels/pooled_topk.py``: 0.0343 → 0.0314 ms at 5% on an H200).

Results equal the torch path up to fp32 rounding: ``tests/test_attention.py`` checks it in the interpreter,
``tests/test_attention_gpu.py`` with TF32×3 on the GPU."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BM, BN, BK, WARPS, PRECISION = 128, 128, 128, 8, "tf32x3"  # the score tiles: query rows, key blocks, head-dim step
SMALL = (64, 64, 128, 4, "tf32x3")  # the tiles when the default's programs would fill under half the SMs (``_default``)


def _config(name: str, default: tuple) -> tuple:
    """A launch configuration, or its override from the environment (a tuning knob, read at each call:
    ``VIDSPARSE_SCORES_CONFIG`` = BM/BN/BK/warps/precision)."""
    env = os.environ.get(name)
    if not env:
        return default
    parts = env.split("/")
    try:
        if len(parts) != len(default):
            raise ValueError
        got = tuple(type(d)(x) for d, x in zip(default, parts))
    except ValueError:
        from ...errors import InputError

        raise InputError(f"{name}={env!r}: expected {len(default)} fields like "
                         f"{'/'.join(map(str, default))} (rows/key blocks/head-dim step/warps/precision)") from None
    return got


@triton.jit
def _scores(QP, KP, S, HK, G, NQB, NKB, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, PRECISION: tl.constexpr):
    bk = tl.program_id(0).to(tl.int64)  # batch · KV head (int64: at 1M tokens offsets pass 2^31 past 4.5 KV heads)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)  # over the G · NQB pooled queries of this KV head
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    q_base = QP + bk * G * NQB * D  # the KV head's G query heads are consecutive in [B, H, NQB, D]
    k_base = KP + bk * NKB * D
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.static_range(0, BD, BK):
        dd = k0 + tl.arange(0, BK)
        q = tl.load(q_base + rows[:, None] * D + dd[None, :], mask=(rows[:, None] < G * NQB) & (dd[None, :] < D),
                    other=0.0)
        k = tl.load(k_base + cols[None, :] * D + dd[:, None], mask=(cols[None, :] < NKB) & (dd[:, None] < D),
                    other=0.0)
        acc = tl.dot(q, k, acc, input_precision=PRECISION)
    tl.store(S + bk * G * NQB * NKB + rows[:, None] * NKB + cols[None, :], acc,
             mask=(rows[:, None] < G * NQB) & (cols[None, :] < NKB))


def _default(programs: int, device: torch.device) -> tuple:
    """The launch configuration: 128 × 128 tiles, or ``SMALL`` (64 × 64 tiles, 4 warps) where 128 × 128 would launch
    programs for fewer than half the GPU's SMs (at 16K tokens, 28 programs for 28/4 heads and for 28/28). Measured on
    an H200 (``profile_estimation.py --env-ab VIDSPARSE_SCORES_CONFIG=128/128/128/8/tf32x3,64/64/128/4/tf32x3``,
    ``block_topk`` at 5%, GPU ms of the whole estimate, ``profile_estimation_s10{8,9}_scores*.json``): at 16K 0.0389
    → 0.0358 (28/4) and 0.0605 → 0.0563 (28/28); at 32K (112 programs) 64 × 64 was slower, 0.0812 → 0.0827 (28/4)
    and 0.1120 → 0.1137 (28/28)."""
    from .fit import sm_count

    return SMALL if 2 * programs < sm_count(device) else (BM, BN, BK, WARPS, PRECISION)


def scores(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """qp float32 [B, H, NQ, D], kp float32 [B, Hkv, NK, D] (H a multiple of Hkv; query head h reads key head
    h // (H / Hkv)) -> float32 [B, H, NQ, NK]: qp · kpᵀ, TF32×3 on the tensor cores."""
    b, h, nqb, d = qp.shape
    hk, nkb = kp.shape[1], kp.shape[2]
    if h % hk or kp.shape[0] != b or kp.shape[-1] != d:
        raise ValueError(f"scores: qp {tuple(qp.shape)} and kp {tuple(kp.shape)} do not match")
    qp = qp.float().contiguous()
    kp = kp.float().contiguous()
    out = torch.empty(b, h, nqb, nkb, dtype=torch.float32, device=qp.device)
    if out.numel() == 0:
        return out
    g = h // hk
    bd = max(16, triton.next_power_of_2(d))
    config = _config("VIDSPARSE_SCORES_CONFIG", _default(b * hk * triton.cdiv(g * nqb, BM) * triton.cdiv(nkb, BN),
                                                         qp.device))
    bm, bn, bk, warps, precision = config
    grid = (b * hk, triton.cdiv(g * nqb, bm), triton.cdiv(nkb, bn))
    launch = lambda _: _scores[grid](qp, kp, out, hk, g, nqb, nkb, D=d, BD=bd, BM=bm, BN=bn,  # noqa: E731
                                     BK=min(bk, bd), PRECISION=precision, num_warps=warps)
    # 64 KB by default, within every supported GPU; an override that does not fit is a clear error
    from . import fit

    fit.launch_fitting("pooled_block_scores", qp.device, (d, *config), [config], launch,
                       instead="a smaller VIDSPARSE_SCORES_CONFIG or the pattern option backend=reference")
    return out
