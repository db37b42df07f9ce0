"""``sparse_attention``: the public op. The Triton kernel on CUDA GPUs that run it; elsewhere (the CPU, older GPUs or
Triton) the block-wise torch path of ``blockwise.py``, whose memory stays within a chunk budget; the dense fp32
oracle of ``reference.py`` on request."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..errors import InputError, UnsupportedError
from .layout import BlockLayout, cached_arange, gather_rows, scatter_rows, shape_cache

BACKENDS = ("auto", "kernel", "torch", "reference")


def check_backend(backend: str) -> None:
    """``InputError`` unless ``backend`` is one of ``BACKENDS`` (``sparse_attention`` and ``attention_scope``)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown attention backend {backend!r}: {', '.join(BACKENDS)}")


def kernel_available(q: Tensor) -> bool:
    """The kernel serves CUDA tensors on a GPU of compute capability 8.0 or newer, with Triton 3.4 or newer
    (``kernels/fit.py``). (CPU tensors run it only when asked, under TRITON_INTERPRET=1, in tests.)"""
    from .kernels.fit import kernel_device

    return kernel_device(q)


def use_tma(q: Tensor, block_q: int, block_k: int) -> bool:
    """Hopper or newer, 128x128 blocks, head dim 64 or 128: the TMA variant (benchmarks/tune_attention.py measured
    it 5-7% faster than pointer loads on an H100). ``VIDSPARSE_ATTENTION_TMA=0`` turns it off."""
    if not q.is_cuda or os.environ.get("VIDSPARSE_ATTENTION_TMA", "1") == "0":
        return False
    from .kernels.fit import capability

    return (capability(q.device) >= (9, 0) and q.shape[-1] in (64, 128)
            and q.dtype in (torch.bfloat16, torch.float16)
            and block_q == 128 and block_k == 128)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, *, causal: bool | None = None,
                     scale: float | None = None, seqlens_q: Tensor | None = None, seqlens_k: Tensor | None = None,
                     backend: str = "auto") -> Tensor:
    """Attention computed only where ``layout`` says.

    q [B, H, Nq, D]; k, v [B, Hkv, Nk, D] with Hkv dividing H (GQA, K/V never expanded); bf16, fp16 or fp32.
    ``layout``: a ``BlockLayout``, or a ``PyramidLayout`` (pooled blocks), ``PermutedLayout`` (permuted keys),
    ``TokenLayout`` (kept tokens) or ``GroupLayout`` (permuted groups).
    ``seqlens_q``/``seqlens_k`` int [B]: per-sequence lengths of a padded batch (rows past them are 0; block layouts
    only; a length past N computes what N does, one below 0 what 0 does: never read on the host).
    ``backend``: "auto" (the kernel where ``kernel_available``, else "torch"), "kernel" (the Triton kernel), "torch"
    (``blockwise.blockwise_attention``: only the listed blocks, through torch's SDPA in the inputs' dtype, in chunks of
    at most ``VIDSPARSE_TORCH_ATTENTION_MB`` MiB of temporaries) or "reference" (the dense fp32 oracle: memory grows as
    H·Nq·Nk, for tests)."""
    from .layout import GroupLayout, PermutedLayout, PyramidLayout, TokenLayout

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError("q, k, v must be [B, H, N, D]")
    check_backend(backend)
    b, h, nq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d or h % k.shape[1]:
        raise InputError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise InputError(f"q, k, v must share one dtype of bf16, fp16 or fp32, not {q.dtype}, {k.dtype}, {v.dtype}")
    if not all(hasattr(layout, a) for a in ("q_len", "k_len", "causal")):
        raise InputError(f"layout must be a BlockLayout (or a pattern's other layouts), not {type(layout).__name__}")
    if (layout.q_len, layout.k_len) != (nq, k.shape[2]):
        raise InputError(f"layout is for {layout.q_len}x{layout.k_len}, inputs are {nq}x{k.shape[2]}")
    causal = layout.causal if causal is None else causal
    if causal != layout.causal:
        raise InputError("causal flag differs from the layout's")
    if nq == 0:  # no queries: nothing to compute
        return q.new_zeros(b, h, 0, d)
    if k.shape[2] == 0:
        raise InputError("k and v hold no tokens: every query would attend nothing")
    for name, lens in (("seqlens_q", seqlens_q), ("seqlens_k", seqlens_k)):
        if lens is not None and (not isinstance(lens, Tensor) or lens.shape != (b,) or lens.is_floating_point()
                                 or lens.dtype == torch.bool or lens.is_complex()):
            shape = tuple(lens.shape) if isinstance(lens, Tensor) else type(lens).__name__
            raise InputError(f"{name} must be an integer tensor [B] = [{b}] (one length per sequence), not {shape}"
                             + (f" {lens.dtype}" if isinstance(lens, Tensor) else ""))
    if not isinstance(layout, BlockLayout) and (seqlens_q is not None or seqlens_k is not None):
        raise InputError(f"per-sequence lengths need a BlockLayout, not a {type(layout).__name__}")
    if isinstance(layout, TokenLayout):
        return token_sparse_attention(q, k, v, layout, scale=scale, backend=backend)
    if isinstance(layout, GroupLayout):
        return grouped_attention(q, k, v, layout, scale=scale, backend=backend)
    from .kernels.fit import ATTENTION_HEAD_DIMS

    if backend == "auto":  # the kernel where it runs, for head dims it was built for (e.g. not 80 or 96)
        backend = "kernel" if kernel_available(q) and d in ATTENTION_HEAD_DIMS else "torch"
    elif backend == "kernel":  # asked for: a clear error where it cannot run ("auto" checked that just above)
        from .kernels.fit import require_kernel_device

        require_kernel_device(q)
        if d not in ATTENTION_HEAD_DIMS:
            raise UnsupportedError(f"the attention kernel takes head dims {', '.join(map(str, ATTENTION_HEAD_DIMS))}, "
                                   f"not {d}: use backend 'torch' (or 'auto', which does)")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UnsupportedError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for testing)")
    use_kernel = backend == "kernel"
    if use_kernel:
        from .kernels.block_sparse import block_sparse_attention as run
    elif backend == "torch":
        from .blockwise import blockwise_attention as run
    if isinstance(layout, PyramidLayout):
        if backend == "reference":
            from .reference import pyramid_attention

            return pyramid_attention(q, k, v, layout, scale)
        lay = layout.expand(b, h)
        width = max(p.kv_index.shape[-1] for p in lay.pooled)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        pidx = torch.stack([pad(p.kv_index) for p in lay.pooled]).contiguous()
        pcnt = torch.stack([p.kv_count for p in lay.pooled]).contiguous()
        return run(q, k, v, lay.exact.kv_index, lay.exact.kv_count, lay.exact.block_q, lay.exact.block_k, causal,
                   scale, pooled=(pidx, pcnt))
    if isinstance(layout, PermutedLayout):
        if backend == "reference":
            from .reference import masked_attention

            return masked_attention(q, k, v, layout.dense_mask(h), scale)
        kg, vg = gather_rows(k, layout.perm), gather_rows(v, layout.perm)
        lay = layout.blocks
        extra = {"tma": use_tma(q, lay.block_q, lay.block_k)} if use_kernel else {}
        return run(q, kg, vg, lay.kv_index, lay.kv_count, lay.block_q, lay.block_k, causal, scale,
                   key_pos=layout.perm, **extra)
    if backend == "reference":
        from .reference import layout_attention

        return layout_attention(q, k, v, layout, scale, seqlens_q, seqlens_k)
    lay = layout.expand(b, h) if layout.kv_index.shape[:2] not in ((1, 1), (b, h), (1, h), (b, 1)) else layout
    extra = {"tma": use_tma(q, layout.block_q, layout.block_k)} if use_kernel else {}
    return run(q, k, v, lay.kv_index, lay.kv_count, layout.block_q, layout.block_k, causal, scale, seqlens_q,
               seqlens_k, **extra)


@shape_cache()
def _dense(q_len: int, k_len: int, causal: bool, device) -> BlockLayout:
    """``BlockLayout.dense`` cached per shape (shared: never modified): the gathered sequences' layout, about a dozen
    torch launches that a token or group layout's execution would otherwise queue after its host sync."""
    return BlockLayout.dense(q_len, k_len, causal=causal, device=device)


def _kv_of(pairs: Tensor, h: int, hk: int) -> Tensor:
    """The K/V plane b·Hkv + h // (H / Hkv) of each query plane b·H + h in ``pairs``."""
    return (pairs // h) * hk + (pairs % h) // (h // hk)


@shape_cache()
def _kv_planes(b: int, h: int, hk: int, device) -> Tensor:
    """``_kv_of`` every query plane, int64 [B·H], cached per shape (shared: never modified)."""
    return _kv_of(torch.arange(b * h, device=device), h, hk)


def _attend_gathered(q: Tensor, k: Tensor, v: Tensor, qidx: Tensor, kidx: Tensor, q_lens: Tensor, k_lens: Tensor,
                     pairs: Tensor, causal: bool, scale: float | None, backend: str,
                     kv_pairs: Tensor | None = None) -> Tensor:
    """Dense (causal) attention inside gathered sequences of some (batch, head) pairs: ``pairs`` int64 [P] (b·H + h),
    ``qidx`` int64 [P, S, Lq] the query positions and ``kidx`` [P, S, Lk] the key positions of each of the P·S
    sequences (each sorted; entries past ``q_lens`` / ``k_lens`` [P, S] are ignored), each query head gathering from
    its KV head. With ``causal`` a sequence's queries sit at its last positions (bottom-right: query i sees keys up
    to i + k_len − q_len). All P·S sequences go to ``sparse_attention`` as one batch with per-sequence lengths.
    ``kv_pairs``: each pair's K/V plane where the caller has it (else computed from ``pairs``); ``kidx`` may be
    ``qidx`` itself (the same positions: clamped once). -> [P, S, Lq, D]."""
    h, d = q.shape[1], q.shape[3]
    hk = k.shape[1]
    p, s, lq = qidx.shape
    lk = kidx.shape[2]
    if kv_pairs is None:
        kv_pairs = _kv_of(pairs, h, hk)
    # x's (batch, head) planes addressed by the kernel: no [1, B·H, N, D] copy of a [B, N, H, D] projection's view
    qflat = qidx.clamp(min=0).reshape(1, p, s * lq)
    if kidx is qidx and q.shape[2] == k.shape[2] and kernel_available(q):  # the same rows of q, k, v: one launch
        from .kernels.gather import gather_qkv

        qg, kg, vg = (t.reshape(p * s, 1, lq, d) for t in gather_qkv(q, k, v, qflat, pairs, kv_pairs))
    else:
        qg = gather_rows(q, qflat, planes=pairs).reshape(p * s, 1, lq, d)
        kflat = qflat if kidx is qidx else kidx.clamp(min=0).reshape(1, p, s * lk)
        kg, vg = (gather_rows(t, kflat, planes=kv_pairs).reshape(p * s, 1, lk, d) for t in (k, v))
    dense = _dense(lq, lk, causal, q.device)
    out = sparse_attention(qg, kg, vg, dense, causal=causal, scale=scale,
                           seqlens_q=q_lens.reshape(-1).to(torch.int32), seqlens_k=k_lens.reshape(-1).to(torch.int32),
                           backend=backend)
    return out.reshape(p, s, lq, d)


def token_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, *, scale: float | None = None,
                           backend: str = "auto") -> Tensor:
    """Execute a ``TokenLayout``: gather each head's kept tokens, run dense (causal) attention on them as a batch of
    B·H sequences of per-head length through ``sparse_attention`` (kernel or reference), write each output row back
    to its position (``scatter_rows``); dropped rows are 0. q [B, H, N, D], k/v [B, Hkv, N, D]. One host sync (the
    longest row); the GPU idles while the host queues what follows it, so that is kept short: the gathered sequences'
    dense layout and the planes are cached per shape (16K tokens, 28/28 heads, video q/k on an H200: 2.2–2.6 →
    1.44–1.50 ms a call as launched, for 0.67 ms of kernels; ``profile_estimation_s130_*``)."""
    b, h, n, d = q.shape
    if (layout.q_len, layout.k_len) != (n, k.shape[2]) or n != k.shape[2]:
        raise InputError(f"token layout is for {layout.q_len}x{layout.k_len}, inputs are {n}x{k.shape[2]}")
    idx = layout.index.expand(b, h, -1) if layout.index.shape[:2] != (b, h) else layout.index
    cnt = layout.count.expand(b, h) if layout.count.shape != (b, h) else layout.count
    # what does not depend on the longest row is ready before the one host sync (cached per shape: no launches)
    pairs, kv_pairs = cached_arange(0, b * h, q.device), _kv_planes(b, h, k.shape[1], q.device)
    lmax = max(int(cnt.max().item()), 1)
    idx = idx[..., :lmax].reshape(b * h, 1, lmax)
    cnt = cnt.reshape(b * h, 1)
    og = _attend_gathered(q, k, v, idx, idx, cnt, cnt, pairs, layout.causal, scale, backend, kv_pairs=kv_pairs)
    out = torch.zeros(b, h, n, d, dtype=q.dtype, device=q.device)
    return scatter_rows(out, idx.reshape(1, b * h, lmax), og.reshape(1, b * h, lmax, d), planes=pairs)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, layout, *, scale: float | None = None,
                      backend: str = "auto") -> Tensor:
    """Execute a ``GroupLayout`` (see its docstring). q [B, H, N, D], k/v [B, Hkv, N, D]."""
    b, h, n, d = q.shape
    s, e = layout.span
    if (layout.q_len, layout.k_len) != (n, k.shape[2]) or n != k.shape[2]:
        raise InputError(f"group layout is for {layout.q_len}x{layout.k_len}, inputs are {n}x{k.shape[2]}")
    grp = layout.group.expand(b, h, -1).reshape(b * h, e - s)
    sizes = layout.group_sizes().expand(b, h, -1).reshape(b * h, e - s)  # members per group id of each pair
    ngs = grp.amax(-1) + 1
    # the one host sync: each pair's group count and largest group; the rest is queued without waiting
    plan = torch.stack([ngs, sizes.amax(-1)]).tolist()
    by_count = torch.argsort(ngs, stable=True)  # pairs with as many groups are consecutive, in pair order
    out = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)  # every row written below
    span = torch.arange(e - s, device=q.device)
    first = 0
    # one batch per group count: a head that splits the span into G groups pads them to its own longest group, not
    # to another head's (a dense head's one group of e − s tokens would pad every group of a strided head to it)
    for ng in sorted(set(plan[0])):
        npairs = plan[0].count(ng)
        lm = max(m for g, m in zip(*plan) if g == ng)
        pairs = by_count[first:first + npairs]
        first += npairs
        gp = grp[pairs]  # [P, N_span]
        # order the span tokens by (group, position): each group's members become contiguous, in original order
        order = torch.argsort(gp * (e - s) + span, dim=-1) + s  # [P, N_span] positions
        counts = sizes[pairs, :ng]  # [P, G]
        starts = torch.cumsum(counts, -1) - counts  # offset of each group in ``order``
        slot = torch.arange(lm, device=q.device)
        pos = torch.gather(order[:, None, :].expand(-1, ng, -1), 2, (starts[..., None] + slot).clamp(max=e - s - 1))
        pos = torch.where(slot < counts[..., None], pos, -1)  # [P, G, Lm] the members' positions, then -1
        # queries: the members alone; keys: the text before the span, then the members (so causal order in the
        # sequence is the original's: member i sits at key s + i, the bottom-right alignment)
        prefix = torch.arange(s, device=q.device).expand(npairs, ng, s)
        og = _attend_gathered(q, k, v, pos, torch.cat([prefix, pos], -1), counts, counts + s, pairs, layout.causal,
                              scale, backend)
        scatter_rows(out, pos.reshape(1, npairs, ng * lm), og.reshape(1, npairs, ng * lm, d), planes=pairs)
    # rows outside the span attend everything (causally: the text before the span sees only itself)
    for rows, keys in ((slice(0, s), s if layout.causal else n), (slice(e, n), n)):
        nr = rows.stop - rows.start
        if nr:
            dense = _dense(nr, keys, layout.causal, q.device)
            out[:, :, rows] = sparse_attention(q[:, :, rows], k[:, :, :keys], v[:, :, :keys], dense, scale=scale,
                                               backend=backend)
    return out


def subset_blocks(keys: Tensor, n: int, block: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """The block layout ``key_subset_attention`` runs for queries 0…n−1 over the gathered keys at sorted positions
    ``keys`` (int64 [K']), computed straight from the positions: (index int32 [1, 1, NQ, NKB], each row's key blocks
    in order; count int32 [1, 1, NQ], the key blocks starting at or before the row's last query; nfull int32 [1, 1,
    NQ], the leading whole blocks whose keys all lie at or before the row's first query, which need no element
    mask). Equal to ``BlockLayout.from_index`` + ``kernels.block_sparse.full_prefix`` on the same keys, in a few
    ops and without a head dimension."""
    m = keys.numel()
    nqb, nkb = -(-n // block), -(-m // block)
    dev = keys.device
    rows = torch.arange(0, nqb * block, block, device=dev)
    count = torch.searchsorted(keys[::block].contiguous(), rows.clamp(max=n - block) + block - 1, right=True,
                               out_int32=True)  # the row's last query: min(row start + block, n) − 1
    whole = keys[block - 1:(m // block) * block:block].contiguous()  # the last key of each whole block
    nfull = torch.searchsorted(whole, rows, right=True, out_int32=True)
    index = torch.arange(nkb, dtype=torch.int32, device=dev).expand(1, 1, nqb, nkb)
    return index, count.view(1, 1, nqb), nfull.view(1, 1, nqb)


def key_subset_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, scale: float | None = None,
                         block: int = 128) -> Tensor:
    """Causal attention of every query over a key subset plus its own key: query i sees the kept keys j ≤ i (``keys``:
    sorted int64 [K'] positions, shared by every head) and itself. The kept keys are gathered once and run through
    the block kernel with their original positions as the causal mask (a query block computes only the key blocks
    that start at or before its last query); a query whose own key was not kept then folds it in through the
    kernel's log-sum-exp, in one more pass (``kernels.own_key``). q [B, H, N, D], k/v [B, Hkv, N, D] -> [B, H, N, D]
    (the kernels: CUDA, or CPU under TRITON_INTERPRET=1)."""
    from .kernels import block_sparse as bs
    from .kernels.own_key import fold_own_key

    b, h, n, d = q.shape
    hk = k.shape[1]
    keys = keys.to(torch.long)
    kg, vg = k.index_select(2, keys), v.index_select(2, keys)  # contiguous copies, no host sync
    index, count, nfull = subset_blocks(keys, n, block)
    out, lse = bs.block_sparse_attention(q, kg, vg, index, count, block, block, True, scale,
                                         key_pos=keys.to(torch.int32).expand(b, hk, keys.numel()), query_offset=0,
                                         nfull=nfull, return_lse=True,
                                         tma=q.is_contiguous() and use_tma(q, block, block))
    # index_fill_, not kept[keys] = True: that assignment copies its host scalar to the GPU and waits for it, so the
    # host work ran after the kernels instead of beside them (an H200 at 16K tokens, half the keys: 2.45 and 3.13 ms a
    # call in two runs with the wait, 1.85 without; benchmarks/results/nvidia-h200/key_subset*.json)
    kept = torch.zeros(n, dtype=torch.bool, device=q.device).index_fill_(0, keys, True)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # each query whose own key was not kept folds it in through the row's log-sum-exp (one pass, in place)
    return fold_own_key(q, k, v, out, lse, kept, scale)
