"""``Pattern``: estimate a ``BlockLayout`` from q and k (the "decide" step), plus shared selection helpers.

Patterns are pure torch, run on the inputs' device, and make no host synchronisation in the hot path except where a
layout's width (its largest row) must be known to allocate the index tensor."""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...errors import InputError
from ..layout import BlockLayout, causal_block_mask, shape_cache


@dataclass(frozen=True)
class SeqMeta:
    """What a pattern may know about the sequence besides q and k.

    ``visual``: (start, end) token span of the video tokens; ``tokens_per_frame``: tokens of one frame (grid h·w);
    ``frame_hw``: that grid's (h, w)."""

    block_q: int = 128
    block_k: int = 128
    causal: bool = True
    visual: tuple[int, int] | None = None
    tokens_per_frame: int | None = None
    frame_hw: tuple[int, int] | None = None

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise InputError(f"block sizes must be at least 1, not {self.block_q}x{self.block_k}")
        if self.tokens_per_frame is not None and self.tokens_per_frame < 1:
            raise InputError(f"tokens_per_frame must be at least 1, not {self.tokens_per_frame}")


_STATIC: dict = {}  # static patterns' layouts (``Pattern.layout``)


class Pattern(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[dict]
    from_layer = 0  # first decoder layer the pattern applies to; earlier layers stay dense (a field where tunable)
    at_least: ClassVar[dict] = {}  # a subclass's fields with their smallest allowed values (sink, local: 0 always)
    fractions: ClassVar[tuple] = ()  # a subclass's fields that must lie in (0, 1]

    def __post_init__(self):
        """Checks every pattern shares (a subclass with its own checks calls this first): a ``backend`` field must
        name one of ``BACKENDS``; ``sink`` and ``local`` fields and those ``at_least`` names must not fall below
        their floor; ``fractions`` must lie in (0, 1]. A ValueError here is the registry's ``SpecError``."""
        if hasattr(self, "backend"):
            check_backend(self.backend)
        for field, low in {"sink": 0, "local": 0, **self.at_least}.items():
            if hasattr(self, field) and getattr(self, field) < low:
                raise ValueError(f"{field} must be >= {low}, not {getattr(self, field)!r}")
        for field in self.fractions:
            if not 0.0 < getattr(self, field) <= 1.0:
                raise ValueError(f"{field} must be in (0, 1], not {getattr(self, field)!r}")

    def __init_subclass__(cls, **kw):
        """Every pattern's own ``estimate`` first checks its q and k (``check_qk``): a clear ``InputError`` instead of
        an indexing error deep inside an estimate."""
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("estimate")
        if own is not None and not getattr(own, "checks_qk", False):
            @functools.wraps(own)
            def estimate(self, q, k, meta, *args, **kwargs):
                check_qk(q, k)
                return own(self, q, k, meta, *args, **kwargs)

            estimate.checks_qk = True
            cls.estimate = estimate

    @abstractmethod
    def estimate(self, q: Tensor, k: Tensor, meta: SeqMeta) -> BlockLayout:
        """q [B, H, N, D], k [B, Hkv, N, D] -> BlockLayout with H heads (or 1 for static patterns)."""

    def layout(self, q: Tensor, k: Tensor, meta: SeqMeta):
        """``estimate`` as a model's prefill calls it: a static pattern (registered ``static=True``: it reads only
        shapes) builds its layout once per settings, metadata, lengths and device, and every later layer gets the
        same one (shared: never modify its tensors in place)."""
        if not self.capabilities.get("static"):
            return self.estimate(q, k, meta)
        key = (type(self).__name__, dataclasses.astuple(self), meta, q.shape[2], k.shape[2], str(q.device))
        if key not in _STATIC:
            if len(_STATIC) >= 64:
                _STATIC.pop(next(iter(_STATIC)))
            with torch.inference_mode(False):  # cached: must serve callers in and out of inference mode
                _STATIC[key] = self.estimate(q, k, meta)
        return _STATIC[key]

    @staticmethod
    def grid(q: Tensor, k: Tensor, meta: SeqMeta) -> tuple[int, int, int, int]:
        nq, nk = q.shape[2], k.shape[2]
        return nq, nk, -(-nq // meta.block_q), -(-nk // meta.block_k)


def check_qk(q: Tensor, k: Tensor) -> None:
    """What every estimate needs of q [B, H, Nq, D] and k [B, Hkv, Nk, D]: four dimensions, the same batch and head
    size, Hkv dividing H, at least one query and one key; an ``InputError`` otherwise."""
    if q.dim() != 4 or k.dim() != 4:
        raise InputError(f"q and k must be [B, H, N, D], not {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}: the same batch and head size, "
                         "and K/V heads dividing the query heads")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise InputError(f"no tokens to estimate on: q {tuple(q.shape)}, k {tuple(k.shape)}")


def row_probs(q_rows: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor | None = None,
              scale: float | None = None) -> Tensor:
    """Exact causal softmax of some query rows over keys: q_rows [B, H, R, D] at positions ``q_pos`` int [R]; k
    [B, Hkv, Nk, D] at positions ``k_pos`` int [Nk] (default 0..Nk−1); a key after a row's position is excluded.
    GQA: each query head scores against its shared key head, K is not expanded. -> float32 [B, H, R, Nk].
    What every probe-query estimate reads: ``grid`` directly; vertical_slash, pbs, token_sparse, FastV, ZipVL and
    SnapKV only its sums over rows, through ``column_probs`` (on CUDA a kernel that never builds this matrix)."""
    b, h, r, d = q_rows.shape
    hk, nk = k.shape[1], k.shape[2]
    a = q_rows.float().reshape(b * hk, (h // hk) * r, d)
    kt = k.float().reshape(b * hk, nk, d).transpose(1, 2)
    with exact_tf32(q_rows, k):  # the scale is applied in the GEMM's epilogue: no extra pass over the scores
        s = torch.baddbmm(a.new_zeros(1, 1, 1), a, kt, beta=0.0,
                          alpha=scale if scale is not None else 1.0 / math.sqrt(d)).reshape(b, h, r, nk)
    k_pos = torch.arange(nk, device=k.device) if k_pos is None else k_pos
    s.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def column_probs(q_rows: Tensor, k: Tensor, q_pos: Tensor, scale: float | None = None,
                 diagonal_first: int | None = None, backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """``row_probs`` summed over its rows: float32 [B, H, Nk] (the attention each key collects from the probe rows),
    and, when ``diagonal_first`` is given (rows at positions diagonal_first, diagonal_first + 1, … ending at the last
    key), ``diagonal_sums`` of it (else None). ``backend``: "kernel" (``kernels.row_mass.column_mass``: two Triton
    passes, the probability matrix never stored; the default on CUDA) or "reference" (torch: ``row_probs``, then the
    sums). Both agree up to fp32 summation order."""
    if use_kernel(backend, q_rows):
        from ..kernels.row_mass import column_mass

        return column_mass(q_rows, k, q_pos, scale=scale, diagonal_first=diagonal_first)
    a = row_probs(q_rows, k, q_pos, scale=scale)
    return a.sum(2), (diagonal_sums(a, diagonal_first) if diagonal_first is not None else None)


def diagonal_sums(a: Tensor, first: int) -> Tensor:
    """slash[o] = Σ_r a[r, first + r − o]: the attention each diagonal offset o collects from rows at consecutive
    positions first, first+1, ..., Nk−1 (a [B, H, R, Nk], zero past each row's position). One skewed view of the
    key-reversed rows, summed over rows — no scatter, no atomics. -> [B, H, Nk]."""
    b, h, r, nk = a.shape
    if first + r != nk:
        raise ValueError(f"rows must end at the last key (first {first} + rows {r} != keys {nk})")
    af = torch.nn.functional.pad(a.flip(-1), (r, 0)).contiguous()  # [B, H, R, R + Nk], R zeros on the left
    w = nk + r
    # row i, offset o reads af[i, r + (nk − 1 − first − i) + o]: rows shift left by one, so the row stride is w − 1;
    # reads past a row's end land in the next row's zero padding
    view = af.as_strided((b, h, r, nk), (h * r * w, r * w, w - 1, 1), af.storage_offset() + r + nk - 1 - first)
    return view.sum(2)


class exact_tf32:
    """Let fp32 CUDA matmuls use TF32 while every operand came from bf16: bf16 values are exact in TF32's 10-bit
    mantissa and accumulation stays fp32, so the result is the fp32 product. A no-op otherwise."""

    def __init__(self, *operands: Tensor):
        self.on = all(t.is_cuda and t.dtype == torch.bfloat16 for t in operands)

    def __enter__(self):
        if self.on:
            self.prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = self.prev


POOL_SAMPLES = 8  # tokens of each block that ``pool_stride=0`` (auto) pools: stride block // 8 (``block_topk``,
# ``pyramid``: 16 before 2026-11-29; on video q/k 8 kept the recall of 16 within 0.0005 and made the estimates 2–16%
# faster at 16K–128K on an H200, BENCHMARKS.md)


def pool_stride(stride: int, block: int, samples: int = POOL_SAMPLES) -> int:
    """The stride a pattern's ``pool_stride`` means for blocks of ``block`` tokens: itself when ≥ 1; 0 (auto) pools
    ``samples`` tokens of each block, stride max(1, block // samples): with the default 8, 16 for 128-token blocks,
    1 up to 15."""
    return stride if stride > 0 else max(1, block // samples)


def pool_blocks(x: Tensor, block: int, scale: float = 1.0, stride: int = 1) -> Tensor:
    """Mean over blocks of the sequence axis, times ``scale``: [B, H, N, D] -> float32 [B, H, ceil(N/block), D] (the
    last block is partial). Reads x once in its own dtype, accumulating in fp32. ``stride`` > 1: the mean of the
    tokens at offsets 0, stride, 2·stride, ... of each block (ceil(block / stride) of them, fewer in a partial last
    block), reading that fraction of x."""
    b, h, n, d = x.shape
    if stride < 1:
        raise InputError(f"pool stride must be at least 1, not {stride}")
    nb = -(-n // block)
    full = n // block
    body = x[:, :, : full * block].reshape(b, h, full, block, d)[:, :, :, ::stride]
    out = _mean(body, 3, scale)
    if nb > full:
        tail = x[:, :, full * block :: stride]
        out = torch.cat([out, _mean(tail, 2, scale).unsqueeze(2)], dim=2)
    return out


def _mean(x: Tensor, dim: int, scale: float) -> Tensor:
    """fp32 mean of x over ``dim``, times ``scale``: the sum times scale / n, or one ``mean`` reduction when ``scale``
    is 1 and n a power of two (16 or 8 pooled keys per block: one launch fewer per estimate on CUDA), where dividing
    by n and multiplying by 1/n give the same bits. (For other n torch's CPU ``mean`` divides and would differ from
    the product in the last bit.)"""
    n = x.shape[dim]
    if scale == 1.0 and n & (n - 1) == 0:
        return x.mean(dim, dtype=torch.float32)
    return x.sum(dim, dtype=torch.float32).mul_(scale / n)


def block_scores(q: Tensor, k: Tensor, meta: SeqMeta, kp: Tensor | None = None, masked: bool = True,
                 backend: str = "auto", stride: int = 1, samples: int = POOL_SAMPLES) -> Tensor:
    """pooled(Q)·pooled(K)ᵀ/√D per (query block, key block), blocks past the causal diagonal at -inf (unless
    ``masked`` is False): float [B, H, NQ, NK]. ``kp``: already pooled keys [B, Hkv, NK, D] (e.g. of a permuted K).
    GQA: each query head scores against its shared key head. ``stride``: pool every ``stride``-th token of each
    block (``pool_blocks``; 0: ``pool_stride``'s auto, ``samples`` tokens of each block). ``backend``: the product
    of the pooled tensors on the tensor cores in TF32×3, about fp32 accuracy ("kernel", ``kernels.pooled_scores``;
    "auto" on CUDA), or torch's fp32 GEMM, which cuBLAS runs on the CUDA cores ("reference")."""
    b, h, nq, d = q.shape
    hk = k.shape[1]
    qp = pool_blocks(q, meta.block_q, 1.0 / math.sqrt(d), pool_stride(stride, meta.block_q, samples))  # scaled once
    kp = pool_blocks(k, meta.block_k, stride=pool_stride(stride, meta.block_k, samples)) if kp is None else kp
    if use_kernel(backend, qp):
        from ..kernels.pooled_scores import scores

        s = scores(qp, kp)
    else:
        g = h // hk
        s = torch.einsum("bkgmd,bknd->bkgmn", qp.view(b, hk, g, -1, d), kp).reshape(b, h, qp.shape[2], kp.shape[2])
    if meta.causal and masked:
        allowed = causal_block_mask(qp.shape[2], kp.shape[2], meta.block_q, meta.block_k, nq, k.shape[2], q.device)
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def pooled_block_probs(q: Tensor, k: Tensor, meta: SeqMeta, stride: int = 1) -> Tensor:
    """softmax over key blocks of ``block_scores``: float [B, H, NQ, NK]."""
    return torch.softmax(block_scores(q, k, meta, stride=stride), dim=-1)


def forced_blocks(nqb: int, nkb: int, meta: SeqMeta, q_len: int, k_len: int, sink: int, local: int,
                  device) -> Tensor:
    """bool [NQ, NK]: the first ``sink`` key blocks and the ``local`` blocks ending at each row's diagonal. Cached
    per shape and device: shared, never modify it in place."""
    return _forced_blocks(nqb, nkb, meta.block_q, meta.block_k, meta.causal, q_len, k_len, sink, local,
                          torch.device(device) if device is not None else None)


@shape_cache()
def _forced_blocks(nqb, nkb, block_q, block_k, causal, q_len, k_len, sink, local, device) -> Tensor:
    m = torch.arange(nqb, device=device)[:, None]
    n = torch.arange(nkb, device=device)[None, :]
    last_q = torch.clamp((m + 1) * block_q - 1, max=q_len - 1) + (k_len - q_len)
    diag = last_q // block_k if causal else m * block_q // block_k
    return (n < sink) | ((n <= diag) & (n > diag - local))


def keep_top_mass(probs: Tensor, tau: float) -> Tensor:
    """bool like ``probs``: per row, the smallest set of entries whose mass reaches ``tau`` (of the row's total),
    largest first, equal entries in index order (a stable sort); at ``tau`` ≥ 1 every positive entry (not left to
    the rounding of the cumulative sum)."""
    if tau >= 1:
        return probs > 0
    vals, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    total = vals.sum(-1, keepdim=True).clamp_min(1e-30)
    before = vals.cumsum(-1) - vals  # mass of the entries ranked above
    # against tau·total, a product (correctly rounded here and in the kernel's selection), not before / total: the
    # GPU's fp32 division is approximate, and a row at the boundary kept another block on the GPU than here
    keep_sorted = (before < tau * total) & (vals > 0)
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter(-1, order, keep_sorted)


def keep_topk(probs: Tensor, k: Tensor | int) -> Tensor:
    """bool like ``probs``: the top ``k`` entries per row, those > 0 (``k`` an int, or a per-row tensor [NQ]; at a
    tie across the k-th value, whichever entries the selection returns). An int ``k`` takes one unsorted ``topk`` and
    a scatter, not a rank for every entry from a full sort: on an H100 the sort took 0.13 of ``vertical_slash``'s
    0.87 ms at 32K tokens and 0.39 of 4.2 ms at 128K (``profile_estimation_rowmass_*.json``). Per-row counts keep the
    ranks of a full sort."""
    if isinstance(k, Tensor):
        order = torch.argsort(probs, dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(probs.shape[-1], device=probs.device).expand_as(order))
        return (rank < k.view(*([1] * (probs.dim() - 2)), -1, 1)) & (probs > 0)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if k <= 0:
        return keep
    idx = torch.topk(probs, min(k, probs.shape[-1]), dim=-1, sorted=False).indices
    return keep.scatter_(-1, idx, True) & (probs > 0)


def finish_layout(keep, q, k, meta, sink, local):
    """Layout from a kept-block mask plus the always-kept sink and diagonal blocks."""
    nq, nk = q.shape[2], k.shape[2]
    nqb, nkb = keep.shape[-2:]
    keep = keep | forced_blocks(nqb, nkb, meta, nq, nk, sink, local, q.device)
    return BlockLayout.from_block_mask(keep, meta.block_q, meta.block_k, nq, nk, meta.causal, width=nkb)


def mass_layout(probs: Tensor, tau: float, q, k, meta: SeqMeta, sink: int, local: int,
                backend: str = "auto") -> BlockLayout:
    """Per row of block masses ``probs`` [B, H, NQ, NK], the fewest blocks reaching ``tau`` of the row's mass
    (``keep_top_mass``) plus the forced sink and diagonal blocks. ``backend``: "kernel" (``kernels.block_select.
    select_mass``: one Triton program per row finds the threshold by a binary search on the masses and writes the
    row's layout: indices, count, ``kv_full``; the default on CUDA) or "reference" (torch: a stable sort, a
    cumulative sum, a scatter back and the mask-to-index conversion of ``finish_layout``). Both keep the same blocks
    up to the order in which the row's mass is summed."""
    if use_kernel(backend, probs):
        from ..kernels.block_select import select_mass

        index, count, full = select_mass(probs, tau, sink, local, meta.block_q, meta.block_k, q.shape[2],
                                         k.shape[2], meta.causal)
        return BlockLayout(index, count, full, meta.block_q, meta.block_k, q.shape[2], k.shape[2], meta.causal)
    return finish_layout(keep_top_mass(probs, tau), q, k, meta, sink, local)


BACKENDS = ("auto", "kernel", "reference")


def check_backend(backend: str) -> None:
    """A pattern's ``backend`` option must be one of ``BACKENDS`` (raised as a spec error by the registry)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")


def use_kernel(backend: str, x: Tensor) -> bool:
    """The estimation kernels' switch (``backend`` of ``topk_layout``, ``mass_layout``, ``pyramid``, ``xattention``,
    ``block_cdf``): "kernel" always (``UnsupportedError`` on a CUDA GPU older than compute capability 8.0 or with
    Triton older than 3.4), "auto" where the kernels run (``kernels/fit.py``), "reference" never."""
    from ..kernels.fit import kernel_device, require_kernel_device

    if backend == "kernel":
        require_kernel_device(x)
        return True
    return backend == "auto" and kernel_device(x)


def row_totals(budget: Tensor, width: int, nqb: int, nkb: int, meta: SeqMeta, q_len: int, k_len: int, sink: int,
               local: int, device) -> Tensor:
    """Blocks per row for ``topk_layout``: ``budget`` [NQ] raised to the row's forced blocks, capped at its causal
    blocks and at ``width`` (already within [1, NK])."""
    allowed = causal_block_mask(nqb, nkb, meta.block_q, meta.block_k, q_len, k_len, device) if meta.causal else \
        torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    forced = forced_blocks(nqb, nkb, meta, q_len, k_len, sink, local, device) & allowed
    return torch.minimum(torch.maximum(budget.to(device), forced.sum(-1)), allowed.sum(-1)).clamp(max=width)


def topk_layout(scores: Tensor, budget: Tensor | None, width: int, q, k, meta: SeqMeta, sink: int, local: int,
                backend: str = "auto", total: Tensor | None = None) -> BlockLayout:
    """Per row, the forced sink and diagonal blocks plus the highest-scoring others, ``budget`` [NQ] blocks in all
    (never fewer than the forced ones, never more than the row's causal blocks), no host sync. ``scores``
    [B, H, NQ, NK] unmasked (``block_scores(..., masked=False)``); the torch path overwrites it.
    ``backend``: "kernel" (``kernels.block_select``: one Triton program per row finds its ``total``-th largest biased
    score by a binary search and writes the layout — indices of the blocks above it, counts and ``kv_full`` — with no
    torch conversion; the default on CUDA) or "reference" (torch: one in-place pass that puts forced blocks at +inf
    and blocks past the diagonal at -inf, one sorted ``topk`` of ``width`` — an upper bound of every row's total,
    known on the host — and one sort of the kept indices). Both keep the same blocks. ``total``: the rows' block
    counts when the caller has them already (``row_totals`` of the budget; ``block_topk`` caches them per shape),
    else computed from ``budget``."""
    nq, nk = q.shape[2], k.shape[2]
    nqb, nkb = scores.shape[-2:]
    width = max(1, min(width, nkb))
    if total is None:
        total = row_totals(budget, width, nqb, nkb, meta, nq, nk, sink, local, q.device)
    if use_kernel(backend, scores):
        from ..kernels.block_select import select_blocks

        index, count, full = select_blocks(scores, total, width, sink, local, meta.block_q, meta.block_k, nq, nk,
                                           meta.causal)
        return BlockLayout(index, count, full, meta.block_q, meta.block_k, nq, nk, meta.causal)
    allowed = causal_block_mask(nqb, nkb, meta.block_q, meta.block_k, nq, nk, q.device) if meta.causal else \
        torch.ones(nqb, nkb, dtype=torch.bool, device=q.device)
    forced = forced_blocks(nqb, nkb, meta, nq, nk, sink, local, q.device) & allowed
    bias = torch.zeros(nqb, nkb, device=q.device, dtype=scores.dtype)
    bias.masked_fill_(~allowed, float("-inf")).masked_fill_(forced, float("inf"))
    scores.add_(bias)
    top = torch.topk(scores, width, dim=-1, sorted=True).indices.to(torch.int32)  # best first: rows keep a prefix
    valid = torch.arange(width, device=q.device) < total[:, None]
    index = torch.where(valid, top, nkb).sort(-1).values
    return BlockLayout.from_index(torch.where(index >= nkb, 0, index), total.expand(*scores.shape[:-1]),
                                  meta.block_q, meta.block_k, nq, nk, meta.causal)
