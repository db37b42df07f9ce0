"""vidsparse attention inside transformers models, through the official ``AttentionInterface``.

``attention_scope(model, pattern=..., observers=...)`` registers the "vidsparse" attention function (once, on first
use, never at import), switches the language model's attention modules to it for the duration of the ``with`` block
and restores the previous implementation in ``finally``. No module's ``forward`` is reassigned.

In prefill (queries = keys, more than one token, causal) the scope's pattern decides a ``BlockLayout`` per layer and
``sparse_attention`` executes it (the Triton kernel on CUDA, the block-wise torch path elsewhere). Everything
else — decode steps, a scope without a pattern, non-causal modules — is dense SDPA with the same semantics as
transformers' "sdpa" implementation. Prefill is detected from shapes, never from ``cache_position``/``cache``
kwargs, which transformers versions pass differently. Observers (SnapKV, FastV, ZipVL) see each prefill layer's
post-RoPE q, k, v.

Masking: "vidsparse" has no mask function registered, so transformers builds no mask for it and this function applies
causality itself (bottom-right aligned when queries are fewer than keys). It therefore serves unpadded sequences —
what ``Pipeline`` runs (batch 1); a padded batch needs the "sdpa" implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

NAME = "vidsparse"
_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("vidsparse_attention_scope", default=None)
_REGISTERED: set[str] = set()


@dataclass
class Scope:
    """What the attention function does while a scope is active.

    pattern: a ``Pattern`` (None: dense); meta: ``SeqMeta`` for the prefill sequence; observers: objects with
    ``on_prefill_attention(layer_idx, q, k, v, out)`` (any may be absent); layers: only these layer indices use the
    pattern (None: all); backend: ``sparse_attention`` backend; cache: the request's KV cache, whose decode steps a
    quantising cache may hand to a fused kernel (``kv.kivi``). ``stats`` collects per-call figures."""

    pattern: Any = None
    meta: Any = None
    observers: list = field(default_factory=list)
    layers: set | None = None
    backend: str = "auto"
    cache: Any = None
    stats: dict = field(default_factory=lambda: {"sparse_calls": 0, "dense_calls": 0, "density_sum": 0.0,
                                                  "estimate_ms": 0.0, "sync_timing": False})


def current_scope() -> Scope | None:
    return _SCOPE.get()


def estimate_ms(scope: Scope) -> float:
    """Milliseconds the scope's pattern estimation took: host-timed calls (CPU, or ``sync_timing``) plus, on CUDA,
    the GPU time between the events around each call (waits for the last one)."""
    total = scope.stats["estimate_ms"]
    events = scope.stats.get("estimate_events", [])
    if events:
        events[-1][1].synchronize()
        total += sum(a.elapsed_time(b) for a, b in events)
    return total


def _sdpa_backends():
    """SDPA backend priority on CUDA: cuDNN first (about 1.8x flash on H100 at long sequences, benchmarks/attention.py),
    then flash, memory-efficient, math. ``VIDSPARSE_SDPA=default`` leaves PyTorch's own order."""
    import os

    if os.environ.get("VIDSPARSE_SDPA", "cudnn") == "default":
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``scaled_dot_product_attention`` with vidsparse's backend priority on CUDA."""
    order = _sdpa_backends() if q.is_cuda else None
    if order is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    from torch.nn.attention import sdpa_kernel

    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority, cuDNN only when asked alone
        ctx = contextlib.nullcontext()
    with ctx:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """K/V [B, Hkv, N, D] repeated to q's H heads (GQA) for kernels that need equal head counts."""
    if k.shape[1] == q.shape[1]:
        return k, v
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None, causal: bool) -> Tensor:
    """Dense attention [B, H, Nq, D] with GQA; causal is bottom-right aligned when Nq < Nk."""
    nq, nk = q.shape[2], k.shape[2]
    if nq == 1 and k.shape[1] != q.shape[1]:  # a decode step: GQA inside SDPA, no copy of the cache per head
        return sdpa(q, k, v, scale=scale, enable_gqa=True)
    k, v = expand_kv(q, k, v)
    if not causal or nq == 1:
        return sdpa(q, k, v, scale=scale)
    if nq == nk:
        return sdpa(q, k, v, is_causal=True, scale=scale)
    qi = torch.arange(nq, device=q.device)[:, None] + (nk - nq)
    mask = torch.arange(nk, device=q.device)[None, :] <= qi
    return sdpa(q, k, v, attn_mask=mask, scale=scale)


def vidsparse_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                                scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """The function registered as "vidsparse": q [B, H, Nq, D], k/v [B, Hkv, Nk, D] -> ([B, Nq, H, D], None)."""
    scope = _SCOPE.get()
    layer = getattr(module, "layer_idx", None)
    if scope is not None and scope.cache is not None and query.shape[2] == 1 and layer is not None:
        lay = scope.cache.layers[layer] if layer < len(scope.cache.layers) else None
        if getattr(lay, "fused_step", False):  # key/value are kivi's window alone: the kernel reads the rest
            if attention_mask is not None:
                from ..errors import UnsupportedError

                raise UnsupportedError("kivi's fused decode attends to every stored token; it takes no attention "
                                       "mask (padded batches): run it with backend 'torch'")
            from ..attention.kernels.kivi_decode import kivi_decode_attention

            return kivi_decode_attention(query, lay, scaling).transpose(1, 2).contiguous(), None
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if attention_mask is not None:
        # Only reached if someone registered a mask function for "vidsparse": honour it densely.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    nq, nk = query.shape[2], key.shape[2]
    prefill = nq == nk and nq > 1
    keys = None
    if scope is not None and prefill and causal:
        for obs in scope.observers:
            sel = getattr(obs, "select_keys", None)
            if sel is not None:
                keys = sel(layer, query, key)
                if keys is not None:
                    break
    use_pattern = (keys is None and scope is not None and scope.pattern is not None and prefill and causal
                   and (scope.layers is None or layer in scope.layers))
    if use_pattern:
        from ..attention.ops import sparse_attention
        from ..attention.patterns.base import SeqMeta

        meta = scope.meta if scope.meta is not None else SeqMeta()
        if query.is_cuda and not scope.stats.get("sync_timing"):
            # GPU time without a sync: events around the estimation's work on the stream, read after the run
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
            layout = scope.pattern.layout(query, key, meta)
            events[1].record()
            scope.stats.setdefault("estimate_events", []).append(events)
        else:
            t0 = time.perf_counter()
            layout = scope.pattern.layout(query, key, meta)
            if scope.stats.get("sync_timing") and query.is_cuda:
                torch.cuda.synchronize(query.device)
            scope.stats["estimate_ms"] += (time.perf_counter() - t0) * 1e3
        out = sparse_attention(query, key, value, layout, causal=True, scale=scaling, backend=scope.backend)
        scope.stats["sparse_calls"] += 1
        scope.stats["density_sum"] += layout.density_tensor()  # a device tensor: no host sync per layer
    elif keys is not None:
        out = subset_attention(query, key, value, keys, scaling, backend=scope.backend)
        scope.stats["subset_calls"] = scope.stats.get("subset_calls", 0) + 1
        scope.stats["key_fraction_sum"] = scope.stats.get("key_fraction_sum", 0.0) + keys.numel() / key.shape[2]
    else:
        out = _sdpa(query, key, value, scaling, causal)
        if scope is not None and prefill:
            scope.stats["dense_calls"] += 1
    if scope is not None and prefill:
        for obs in scope.observers:
            hook = getattr(obs, "on_prefill_attention", None)
            if hook is not None:
                hook(layer, query, key, value, out)
    return out.transpose(1, 2).contiguous(), None


def subset_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, scale: float | None = None,
                     chunk: int = 4096, backend: str = "auto") -> Tensor:
    """Causal prefill attention of every query over only the keys ``keys`` (sorted int64 [K'] into the sequence):
    query i sees kept key j iff j ≤ i. q [1, H, N, D], k/v [1, Hkv, N, D] -> [1, H, N, D]. A query's own key is always
    allowed (so a query that sees no kept key attends to itself). On CUDA (``backend`` "auto" or "kernel"; "auto" on
    an Ampere or newer GPU) the block kernel runs on the gathered keys (``key_subset_attention``); otherwise
    ("torch", "reference", or "auto" without the kernel) masked SDPA, queries in chunks so the mask stays
    [chunk, K']."""
    from ..attention.kernels.fit import ATTENTION_HEAD_DIMS, require_kernel_device
    from ..attention.ops import kernel_available, key_subset_attention

    if backend == "kernel":
        require_kernel_device(q)
    if backend == "kernel" or (backend == "auto" and kernel_available(q) and q.shape[-1] in ATTENTION_HEAD_DIMS):
        return key_subset_attention(q, k, v, keys, scale)
    n = q.shape[2]
    k, v = expand_kv(q, k, v)
    out = torch.empty_like(q)
    kept = torch.zeros(n, dtype=torch.bool, device=q.device)
    kept[keys] = True
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        qi = torch.arange(a, b, device=q.device)
        # the chunk's own positions join the gathered keys so that every query can see itself
        sub = torch.unique(torch.cat([keys[keys < b], qi]))
        mask = (sub[None, :] <= qi[:, None]) & (kept[sub][None, :] | (sub[None, :] == qi[:, None]))
        out[:, :, a:b] = sdpa(q[:, :, a:b], k[:, :, sub], v[:, :, sub], attn_mask=mask, scale=scale)
    return out


def _register(name: str, fn) -> None:
    """Register ``fn`` as attention implementation ``name`` with transformers' ``AttentionInterface`` (once)."""
    if name not in _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(name, fn)
        _REGISTERED.add(name)


def register() -> None:
    """Register "vidsparse" with transformers' ``AttentionInterface`` (idempotent)."""
    _register(NAME, vidsparse_attention_forward)


def module_configs(root: torch.nn.Module, attention_only: bool) -> list:
    """The distinct config objects modules under ``root`` read ``_attn_implementation`` from (``attention_only``:
    only the attention modules, those carrying a ``layer_idx``; falls back to ``root.config``)."""
    seen, out = set(), []
    for m in root.modules():
        cfg = getattr(m, "config", None)
        if (cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation")
                and (hasattr(m, "layer_idx") or not attention_only)):
            seen.add(id(cfg))
            out.append(cfg)
    return out or [root.config]


@contextlib.contextmanager
def _implementation(configs: list, name: str) -> Iterator[None]:
    """Set ``_attn_implementation = name`` on ``configs`` inside the block; restore the previous ones in ``finally``."""
    previous = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, p in zip(configs, previous):
            c._attn_implementation = p


@contextlib.contextmanager
def attention_scope(llm: torch.nn.Module, pattern=None, meta=None, observers=(), layers=None, backend: str = "auto",
                    sync_timing: bool = False, cache=None) -> Iterator[Scope]:
    """Run ``llm`` (the language model part: its attention modules) with vidsparse attention inside the block.

    Restores each config's previous attention implementation on exit, also on error."""
    from ..attention.ops import check_backend

    check_backend(backend)
    register()
    scope = Scope(pattern=pattern, meta=meta, observers=list(observers), layers=layers, backend=backend, cache=cache)
    scope.stats["sync_timing"] = sync_timing
    fuse = getattr(cache, "set_fused", None)  # a kivi cache: its decode steps read by the kernel, inside the scope only
    if fuse is not None:
        fuse({"auto": "auto", "kernel": "kernel"}.get(backend, "off"))
    token = _SCOPE.set(scope)
    try:
        with _implementation(module_configs(llm, attention_only=True), NAME):
            yield scope
    finally:
        _SCOPE.reset(token)
        if fuse is not None:
            fuse("off")


def last_query_attention(q: Tensor, k: Tensor, rows: int = 1, scale: float | None = None) -> Tensor:
    """Softmax attention of the last ``rows`` queries over all keys, averaged over query rows and heads (GQA-aware):
    float32 [B, Nk]. What FastV ranks tokens by; costs O(rows·N) instead of materialising the N×N matrix."""
    from ..attention.patterns.base import column_probs

    nk = k.shape[2]
    rows = min(rows, q.shape[2])
    cols, _ = column_probs(q[:, :, -rows:], k, torch.arange(nk - rows, nk, device=q.device), scale=scale)
    return cols.mean(1) / rows


# ---- vision towers: packed (varlen) attention in a few batched launches -------------------------------------------

VARLEN_NAME = "vidsparse_varlen_flash"  # transformers hands cu_seqlens only to implementations named "*flash*"
_PLAN_CACHE: dict = {}


def _varlen_plan(cu: Tensor):
    """Group the packed segments of ``cu`` (int [S+1]) by length: [(length, token index [S_L, L] or None, start)].

    One host read of the boundaries per distinct ``cu`` tensor (the tower reuses the same two tensors in all layers)."""
    key = (cu.data_ptr(), cu.numel(), cu.device)
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0] is cu:
        return hit[1]
    bounds = cu.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    groups: dict[int, list[int]] = {}
    for s, n in zip(starts, lengths):
        if n > 0:
            groups.setdefault(n, []).append(s)
    plan = []
    if len(groups) == 1:
        (n, st), = groups.items()
        if st == list(range(bounds[0], bounds[0] + n * len(st), n)):  # equal segments back to back: a reshape
            plan.append((n, None, bounds[0], len(st)))
    if not plan:
        for n, st in groups.items():
            idx = torch.tensor(st, device=cu.device)[:, None] + torch.arange(n, device=cu.device)
            plan.append((n, idx, None, len(st)))
    if len(_PLAN_CACHE) > 64:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = (cu, plan)
    return plan


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float | None = None) -> Tensor:
    """Block-diagonal (packed) non-causal attention: q, k, v [1, H, N, D], segments given by ``cu`` (int [S+1]).

    Segments of equal length are batched into one dense SDPA call each ([S_L, H, L, D]), so a layer costs one launch
    per distinct segment length instead of one per segment, with no padding and SDPA's own numerics. Returns
    [1, H, N, D]."""
    _, h, n, d = q.shape
    out = torch.empty_like(q)
    for length, idx, start, count in _varlen_plan(cu):
        if idx is None:
            sl = slice(start, start + length * count)
            parts = [t[0, :, sl].reshape(h, count, length, d).transpose(0, 1) for t in (q, k, v)]
            o = sdpa(*parts, scale=scale)
            out[0, :, sl] = o.transpose(0, 1).reshape(h, length * count, d)
        else:
            flat = idx.reshape(-1)
            parts = [t[0][:, flat].reshape(h, count, length, d).transpose(0, 1) for t in (q, k, v)]
            o = sdpa(*parts, scale=scale)
            out[0][:, flat] = o.transpose(0, 1).reshape(h, count * length, d)
    return out


@torch.compiler.disable
def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """The function registered as ``VARLEN_NAME``: packed non-causal attention for vision towers (never traced by
    ``torch.compile``: its plan reads segment boundaries on the host; compiled blocks break the graph here)."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        out = _sdpa(query, key, value, scaling, bool(kwargs.get("is_causal", False)))
        return out.transpose(1, 2).contiguous(), None
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k,
                                                                                            cu_seq_lens_q):
        raise ValueError("varlen attention needs the same segments for queries and keys")
    key, value = expand_kv(query, key, value)
    out = varlen_attention(query, key, value, cu_seq_lens_q, scaling)
    return out.transpose(1, 2).contiguous(), None


_COMPILED: dict = {}


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    """A ``torch.compile`` wrapper of ``module``, made once per module and process (dynamic sequence length)."""
    key = id(module)
    hit = _COMPILED.get(key)
    if hit is None or hit[0] is not module:
        hit = (module, torch.compile(module, dynamic=True))
        _COMPILED[key] = hit
    return hit[1]


@contextlib.contextmanager
def vision_scope(tower: torch.nn.Module, compile_blocks: bool = False) -> Iterator[None]:
    """Run a vision tower whose attention splits packed sequences by ``cu_seqlens`` (Qwen2-VL, Qwen2.5-VL) with
    ``varlen_attention``: one batched launch per distinct window/frame length per layer instead of a Python loop of
    one SDPA call per window. Restores the previous implementation on exit.

    ``compile_blocks``: inside the scope the tower's blocks are swapped for ``torch.compile`` wrappers of themselves
    (fusing the norms, the fp32 rotary arithmetic and the MLP's elementwise work; the attention call stays a graph
    break) and swapped back on exit. The first call per shape pays the compilation."""
    _register(VARLEN_NAME, varlen_attention_forward)
    blocks = getattr(tower, "blocks", None) if compile_blocks else None
    originals = list(blocks) if blocks is not None else []
    with _implementation(module_configs(tower, attention_only=False), VARLEN_NAME):
        try:
            for i, blk in enumerate(originals):
                blocks[i] = _compiled(blk)
            yield
        finally:
            for i, blk in enumerate(originals):
                blocks[i] = blk
