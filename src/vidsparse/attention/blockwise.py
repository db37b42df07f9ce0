"""Block-sparse attention in plain torch, with memory bounded by a chunk budget: the path wherever the Triton kernel
does not run (the CPU, GPUs older than Ampere, Triton older than 3.4).

The fp32 oracle in ``reference.py`` writes the layout out as a dense [B, H, Nq, Nk] mask and score matrix: 120 GB at
32K tokens and 28 heads, so it serves tests, not long inputs. This path computes only the listed blocks. Each unit of
work is one (batch, head, query block): its row of key blocks is gathered (GQA reads the shared K/V head through the
index, nothing is expanded) and attended by torch's ``scaled_dot_product_attention`` in the inputs' dtype: SDPA's
fused CPU kernel, or on a GPU its flash or memory-efficient kernel (the latter also runs on GPUs older than Ampere).
Units are taken in chunks whose transient tensors fit ``max_bytes``, so the work follows the layout's density and
peak memory stays near the budget whatever N is. Two ways to run a chunk:

- mask-free (square blocks, no per-sequence lengths or key positions, causal keys ending a whole number of blocks
  after the queries — a block pattern's layout in a model's prefill): units of one width run together without
  padding, and their mask is either none or one shared lower-right causal bias at the diagonal block
  (``_mask_free_groups``);
- masked (everything else): units sorted by width, each chunk padded to its widest row and run under an element
  mask (the unlisted padding, sequence ends, causal positions, pooled levels' ln p biases).

On the H200 at 64K tokens and 28/4 heads the mask-free path measured 34 / 47 / 79 ms at 5 / 10 / 20% density, where
running every chunk masked took 53 / 98 / 190 ms (``benchmarks/results/nvidia-h200/torch_attention.json`` and
``torch_attention_masked_only.json``).

Same semantics as the kernel (``kernels/block_sparse.py``): bottom-right causal alignment per sequence, or key
positions (``key_pos``, permuted keys) with queries at ``i + query_offset``; rows past a sequence's length and rows
that see no key are 0; pyramid levels attend mean-pooled K/V blocks with logit bias ln p and no element mask."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .layout import POOL_LEVELS, pool_levels

DEFAULT_MB = {"cpu": 256, "cuda": 1024}


def default_budget(device: str = "cpu") -> int:
    """Bytes of transient tensors per chunk: ``VIDSPARSE_TORCH_ATTENTION_MB`` MiB, by default 256 on the CPU and
    1024 on a GPU, where chunks of fewer units left SDPA's grid under one wave. On the H200 at 64K tokens, 28/4 heads
    and 5% density, every chunk masked: 147 ms with 256 MiB chunks, 53 ms with 1024, 46 ms with 4096 (which added
    2.3 GB); the bound overestimates there, as SDPA's GPU kernels do not materialise the scores (256 MiB chunks added
    130 MiB). ``benchmarks/results/nvidia-h200/torch_attention_masked_only*``."""
    from ..errors import InputError

    raw = os.environ.get("VIDSPARSE_TORCH_ATTENTION_MB", str(DEFAULT_MB.get(device, DEFAULT_MB["cpu"])))
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb > 0:
        raise InputError(f"VIDSPARSE_TORCH_ATTENTION_MB must be a positive number of MiB, got {raw!r}")
    return int(mb * 2**20)


def _unit_bytes(cols: int, bq: int, d: int) -> int:
    """Transient bytes of one unit with ``cols`` gathered key columns, an upper bound: fp32 scores and probabilities
    (what SDPA's math backend materialises; the fused kernels need far less) and two bool masks ([bq, cols] each),
    gathered K and V ([cols, D] each, at most 4 bytes an element, counted 1.5 times for the pyramid's
    concatenation), the query block and its output in fp32, the column indices."""
    return 4 * (2 * bq * cols + 3 * cols * d + 2 * bq * d) + 2 * bq * cols + 16 * cols


def _chunks(widths: list[int], extra: list[int], cost, budget: int, groups: list | None = None):
    """Consecutive [start, end) runs of units that together cost at most ``budget`` bytes, each unit padded to the
    run's widest row: ``widths`` listed blocks and ``extra`` further columns per unit, ``cost(width, extra)`` bytes
    per unit; a run never spans two ``groups`` values. Yields (start, end, width); a unit over the budget on its
    own still runs, alone."""
    start, n = 0, len(widths)
    while start < n:
        w, x = widths[start], extra[start]
        end = start + 1
        while end < n:
            w2, x2 = max(w, widths[end]), max(x, extra[end])
            if (end + 1 - start) * cost(w2, x2) > budget or (groups is not None and groups[end] != groups[start]):
                break
            w, x, end = w2, x2, end + 1
        yield start, end, w
        start = end


def _gather_blocks(x: Tensor, blocks: Tensor) -> Tensor:
    """x [R, bk, D] block-major, blocks int64 [U, W] -> [U, W·bk, D]."""
    u, w = blocks.shape
    return x.index_select(0, blocks.reshape(-1)).reshape(u, w * x.shape[1], x.shape[2])


def _block_major(x: Tensor, blocks: int, block: int) -> Tensor:
    """x [B, heads, N, D] -> [B·heads·blocks, block, D], zero-padded to whole blocks (a view when x is contiguous
    and already whole)."""
    b, hk, n, d = x.shape
    if n != blocks * block:
        x = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - n))
    return x.reshape(b * hk * blocks, block, d)


def _mask_free_groups(index: Tensor, count: Tensor, widths: list[int], um: Tensor, nq: int, nk: int, bq: int,
                      bk: int, causal: bool) -> list | None:
    """Per unit (width, ends_at_edge) when the call needs no per-unit mask, else None. Square blocks, no per-sequence
    lengths or key positions, and for causal calls keys ending a whole number of blocks after the queries
    (Nk − Nq ≥ 0, a multiple of the block): then a row's blocks before its diagonal block are entirely visible, and
    the diagonal block, when listed, is its last one, where the causal mask is the same for every unit of that width
    (lower-right aligned over the gathered keys; padding keys past Nk fall behind every real query). Non-causal, only
    a partial last key block needs a mask: its padding, again at the same place for every unit of that width. Units
    of one (width, ends_at_edge) then share a mask, or need none: SDPA runs without a mask tensor and no padding."""
    off = nk - nq
    if bq != bk or (causal and (off < 0 or off % bk)):
        return None
    nkb = -(-nk // bk)
    last = torch.gather(index, 1, (count - 1).clamp(min=0)[:, None])[:, 0]
    edge = um + off // bk if causal else torch.full_like(um, nkb - 1)  # the diagonal block, or the partial one
    if causal and bool((last > edge)[count > 0].any()):
        return None  # a block past the diagonal: not a causal layout of this shape, take the masked path
    ends = ((last == edge) & (count > 0)).tolist()
    if not causal and nk % bk == 0:
        ends = [False] * len(ends)
    return [(w, e) for w, e in zip(widths, ends)]


def _run_mask_free(q: Tensor, kb: Tensor, vb: Tensor, qb: Tensor, out: Tensor, units: Tensor, index: Tensor,
                   kv_head: Tensor, nkb: int, at_edge: bool, nk: int, causal: bool, scale: float) -> None:
    """Units of one width whose rows all see their listed blocks whole, except at the edge block when
    ``at_edge`` (see ``_mask_free_groups``): SDPA with no mask, a lower-right causal bias, or one shared column
    mask; outputs into ``out`` at ``units``."""
    n_u, w = index.shape
    bq, d = qb.shape[1], qb.shape[2]
    if w == 0:  # rows that see nothing
        out.index_copy_(0, units, torch.zeros(n_u, bq, d, dtype=out.dtype, device=out.device))
        return
    blocks = kv_head[:, None] * nkb + index
    kg, vg = _gather_blocks(kb, blocks), _gather_blocks(vb, blocks)
    mask = None
    if at_edge and causal:
        cols = w * kb.shape[1]
        if q.is_cuda:  # flash and memory-efficient SDPA apply it without a mask tensor
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(bq, cols)
        else:  # the same [bq, cols] mask CausalBias would build here, without importing it (1.2 s, 120 MiB)
            mask = torch.arange(cols, device=q.device) <= torch.arange(bq, device=q.device)[:, None] + (cols - bq)
    elif at_edge:  # non-causal: the padding of the partial last block, the last columns
        bk = kb.shape[1]
        mask = (torch.arange(w * bk, device=q.device) < (w - 1) * bk + nk - (nkb - 1) * bk)[None]  # [1, W·bk]
    o = torch.nn.functional.scaled_dot_product_attention(qb.index_select(0, units)[:, None], kg[:, None], vg[:, None],
                                                         attn_mask=mask, scale=scale)
    out.index_copy_(0, units, o[:, 0])


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, kv_index: Tensor, kv_count: Tensor, block_q: int,
                        block_k: int, causal: bool, scale: float | None = None, seqlens_q: Tensor | None = None,
                        seqlens_k: Tensor | None = None, *, key_pos: Tensor | None = None,
                        query_offset: int | None = None, pooled: tuple | None = None,
                        max_bytes: int | None = None) -> Tensor:
    """q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; kv_index int [B|1, H|1, NQ, W] (each row's key blocks, the first
    kv_count [B|1, H|1, NQ] of them read). ``key_pos`` int [B, Hkv, Nk]: the keys' original positions for the causal
    mask (query i at position i + ``query_offset``, default Nk − Nq); otherwise query i sees key j ≤ i + (lk − lq)
    of its sequence. ``pooled``: the pyramid levels 2, 4, 8 as (index [3, B|1, H|1, NQ, Wp], count [3, B|1, H|1,
    NQ]); pooled blocks get no element mask. Computed by SDPA in q's dtype (fp32 accumulation in its fused
    kernels). ``max_bytes`` bounds a chunk's transient tensors (default ``default_budget`` of q's device)."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    bq, bk = block_q, block_k
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dev = q.device
    budget = default_budget(dev.type) if max_bytes is None else int(max_bytes)
    lq = seqlens_q.to(dev).long() if seqlens_q is not None else torch.full((b,), nq, device=dev)
    lk = seqlens_k.to(dev).long() if seqlens_k is not None else torch.full((b,), nk, device=dev)
    if key_pos is not None:
        off = torch.full((b,), nk - nq if query_offset is None else int(query_offset), device=dev)
    else:
        off = lk - lq  # bottom-right causal alignment per sequence

    units = b * h * nqb  # one per (batch, head, query block), in that order
    width = kv_index.shape[-1]
    index = kv_index.expand(b, h, nqb, width).reshape(units, width).long()
    count = kv_count.expand(b, h, nqb).reshape(units).long()
    unit = torch.arange(units, device=dev)
    ub, um = unit // (h * nqb), unit % nqb
    kv_head = ub * hk + (unit // nqb) % h // (h // hk)  # the unit's K/V head in [B·Hkv]: GQA without expansion

    qb = _block_major(q, nqb, bq)  # [units, bq, D]
    kb, vb = _block_major(k, nkb, bk), _block_major(v, nkb, bk)
    if key_pos is not None:  # padding keys sit past every query (and past lk: masked either way)
        kpb = torch.nn.functional.pad(key_pos.to(dev).long(), (0, nkb * bk - nk), value=nk + nq)
        kpb = kpb.reshape(b * hk * nkb, bk)

    # pyramid levels: block-major mean-pooled K/V over the whole blocks, listed blocks and counts per unit
    levels = []
    full = nk // bk
    if pooled is not None and full:
        pidx, pcnt = pooled
        for li, (p, kp, vp) in enumerate(zip(POOL_LEVELS, pool_levels(k, full, bk), pool_levels(v, full, bk))):
            lcount = pcnt[li].expand(b, h, nqb).reshape(units).long()
            levels.append((p, _block_major(kp, full, bk // p), _block_major(vp, full, bk // p),
                           pidx[li].expand(b, h, nqb, pidx.shape[-1]).reshape(units, -1).long(), lcount,
                           lcount.tolist()))

    # host-side widths, read once. Units run in order of width (a chunk pads to its widest row; in layout order a
    # causal chunk spans short and long rows and padding doubled the work), each chunk's output put back in place.
    widths = count.tolist()
    extra = [sum(c * (bk // lv[0]) for lv, c in zip(levels, cs)) for cs in zip(*(lv[5] for lv in levels))] \
        if levels else [0] * units
    groups = _mask_free_groups(index, count, widths, um, nq, nk, bq, bk, causal) if (
        key_pos is None and not levels and seqlens_q is None and seqlens_k is None) else None
    if groups is not None:
        order = sorted(range(units), key=lambda u: (groups[u], u))
        groups = [groups[u] for u in order]
    else:
        order = sorted(range(units), key=lambda u: (widths[u] * bk + extra[u], u))
    widths, extra = [widths[u] for u in order], [extra[u] for u in order]
    slots = torch.tensor(order, device=dev)  # run position -> unit
    index, count, ub, um, kv_head = (t[slots] for t in (index, count, ub, um, kv_head))
    levels = [(p, kp, vp, pidx_u[slots], pcnt_u[slots], [host[u] for u in order])
              for p, kp, vp, pidx_u, pcnt_u, host in levels]
    out = torch.empty(units, bq, d, dtype=q.dtype, device=dev)
    rows_in_block = torch.arange(bq, device=dev)
    cols_in_block = torch.arange(bk, device=dev)
    # the additive mask's dtype: SDPA takes q's; the pyramid's ln p biases need fp32 (its chunks then run in fp32)
    mdt = torch.float32 if levels and q.dtype != torch.float32 else q.dtype
    neg = float("-inf")
    for s, e, w in _chunks(widths, extra, lambda w_, x_: _unit_bytes(w_ * bk + x_, bq, d), budget, groups):
        if groups is not None:  # every unit of the run has ``w`` blocks and the same mask: a shared one, or none
            _run_mask_free(q, kb, vb, qb, out, slots[s:e], index[s:e, :w], kv_head[s:e], nkb, groups[s][1], nk,
                           causal, scale)
            continue
        n_u, w = e - s, max(w, 1)
        idx = index[s:e, :w].clamp(0, nkb - 1)
        blocks = kv_head[s:e, None] * nkb + idx
        kg, vg = _gather_blocks(kb, blocks), _gather_blocks(vb, blocks)  # [U, W·bk, D]
        key_idx = (idx[:, :, None] * bk + cols_in_block).reshape(n_u, w * bk)  # into the (permuted) keys
        listed = (torch.arange(w, device=dev) < count[s:e, None]).repeat_interleave(bk, 1)
        cols = listed & (key_idx < lk[ub[s:e], None])  # [U, W·bk]: listed keys inside the sequence
        rows = um[s:e, None] * bq + rows_in_block  # [U, bq]
        row_ok = rows < lq[ub[s:e], None]
        col_bias = torch.zeros(cols.shape, dtype=mdt, device=dev).masked_fill_(~cols, neg)
        if causal:  # key visible iff its position ≤ the row's; a row sees some key iff the earliest valid one is
            pos = _gather_blocks(kpb[..., None], blocks)[..., 0] if key_pos is not None else key_idx
            limit = rows + off[ub[s:e], None]
            seen = row_ok & (torch.where(cols, pos, nk + nq).amin(-1, keepdim=True) <= limit)
            mask = torch.where(pos[:, None, :] <= limit[:, :, None], col_bias[:, None, :], neg)  # [U, bq, W·bk]
        else:
            seen = row_ok & cols.any(-1, keepdim=True)
            mask = col_bias[:, None, :]  # one row, broadcast
        masks, keys, values = [mask], [kg], [vg]
        for p, kp, vp, pidx_u, pcnt_u, pcnt_host in levels:
            pw = max(pcnt_host[s:e])
            if not pw:
                continue
            pblocks = kv_head[s:e, None] * full + pidx_u[s:e, :pw].clamp(0, full - 1)
            plisted = (torch.arange(pw, device=dev) < pcnt_u[s:e, None]).repeat_interleave(bk // p, 1)
            seen |= row_ok & plisted.any(-1, keepdim=True)
            # a pooled key stands for p keys: logit bias ln p
            masks.append(torch.full(plisted.shape, math.log(p), dtype=mdt, device=dev).masked_fill_(~plisted, neg))
            keys.append(_gather_blocks(kp, pblocks))
            values.append(_gather_blocks(vp, pblocks))
        qc = qb.index_select(0, slots[s:e])
        if len(masks) > 1:
            mask = torch.cat([m.expand(n_u, bq, -1) for m in (masks[0], *(m[:, None, :] for m in masks[1:]))], -1)
            qc, kg, vg = qc.to(mdt), torch.cat(keys, 1).to(mdt), torch.cat(values, 1).to(mdt)
        del masks, keys, values
        o = torch.nn.functional.scaled_dot_product_attention(qc[:, None], kg[:, None], vg[:, None],
                                                             attn_mask=mask[:, None], scale=scale)[:, 0]
        out.index_copy_(0, slots[s:e], o.masked_fill_(~seen[..., None], 0.0).to(q.dtype))  # no key: 0, not NaN
    out = out.reshape(b, h, nqb * bq, d)
    return out if nqb * bq == nq else out[:, :, :nq].contiguous()
