"""The fp32 oracle: masked softmax attention, written for clarity. Every kernel is checked against it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import BlockLayout


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None,
                     dtype=torch.float32, bias: Tensor | None = None) -> Tensor:
    """q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (Hkv divides H), mask bool broadcastable to [B, H, Nq, Nk]; ``bias``
    (broadcastable to the same) is added to the scaled logits.

    Rows with no allowed key return 0. Computed in ``dtype`` (fp32 by default), returned in q's dtype."""
    b, h, nq, d = q.shape
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} key/value heads")
    g = h // hk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.to(dtype)
    kf = k.to(dtype).repeat_interleave(g, dim=1)
    vf = v.to(dtype).repeat_interleave(g, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
    if bias is not None:
        s = s + bias.to(dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
    return torch.einsum("bhqk,bhkd->bhqd", p, vf).to(q.dtype)


def layout_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, scale: float | None = None,
                     seqlens_q: Tensor | None = None, seqlens_k: Tensor | None = None, dtype=torch.float32) -> Tensor:
    """Attention restricted to ``layout`` (and to per-batch lengths when given; rows past a length are 0)."""
    b, h = q.shape[:2]
    mask = layout.expand(b, h).dense_mask()
    if seqlens_q is not None or seqlens_k is not None:
        lq = seqlens_q if seqlens_q is not None else torch.full((b,), q.shape[2], device=q.device)
        lk = seqlens_k if seqlens_k is not None else torch.full((b,), k.shape[2], device=q.device)
        qi = torch.arange(q.shape[2], device=q.device)
        kj = torch.arange(k.shape[2], device=q.device)
        ok = (qi[None, :, None] < lq[:, None, None]) & (kj[None, None, :] < lk[:, None, None])
        if layout.causal:  # bottom-right alignment per sequence
            ok &= kj[None, None, :] <= qi[None, :, None] + (lk - lq)[:, None, None]
            # the layout's own causal mask used global lengths; recompute the block part without it
            mask = layout.expand(b, h).block_mask()
            mask = mask.repeat_interleave(layout.block_q, 2)[:, :, : layout.q_len]
            mask = mask.repeat_interleave(layout.block_k, 3)[:, :, :, : layout.k_len]
        mask = mask & ok[:, None]
    return masked_attention(q, k, v, mask, scale, dtype)


def pyramid_attention(q: Tensor, k: Tensor, v: Tensor, layout, scale: float | None = None,
                      dtype=torch.float32) -> Tensor:
    """A ``PyramidLayout`` written out: the keys are the exact keys followed by the mean-pooled keys of every level
    (values likewise); each query row may see the exact keys of its exact blocks (causally) and the pooled keys of
    its pooled blocks, the latter with logit bias ln p."""
    import math as _math

    from .layout import POOL_LEVELS

    b, h, nq, d = q.shape
    hk = k.shape[1]
    lay = layout.expand(b, h)
    bq, bk = lay.exact.block_q, lay.exact.block_k
    full = layout.k_len // bk
    ks, vs, masks = [k.to(dtype)], [v.to(dtype)], [lay.exact.dense_mask()]
    bias = [torch.zeros(layout.k_len, dtype=dtype, device=q.device)]
    for p, pl in zip(POOL_LEVELS, lay.pooled):
        for src, dst in ((k, ks), (v, vs)):
            dst.append(src[:, :, : full * bk].to(dtype).reshape(b, hk, -1, p, d).mean(3))
        m = pl.block_mask()[..., :full].repeat_interleave(bq, 2)[:, :, :nq].repeat_interleave(bk // p, 3)
        masks.append(m)
        bias.append(torch.full((full * bk // p,), _math.log(p), dtype=dtype, device=q.device))
    return masked_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(masks, -1), scale, dtype,
                            bias=torch.cat(bias))


def fold_own_key(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kept: Tensor, scale: float) -> Tensor:
    """fp32 oracle of ``kernels.own_key.fold_own_key``: where key i was not kept, query i's own key joins the row
    through its log-sum-exp ``lse`` (natural log, −∞ for a row that saw nothing): w = σ(scale · q_i·k_i − ℓ),
    out + w · (v_i − out). q/out [B, H, N, D], k/v [B, Hkv, N, D], lse [B, H, N], kept [N] bool; a new fp32 tensor."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = (q.float() * kk).sum(-1) * scale
    w = (torch.sigmoid(s - lse.float()) * ~kept)[..., None]
    return out.float() + w * (vv - out.float())
