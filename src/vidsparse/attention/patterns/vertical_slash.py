"""``vertical_slash``: MInference's vertical-slash pattern."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout, shape_cache
from .base import Pattern, SeqMeta, column_probs, keep_topk, use_kernel


@PATTERNS.register("vertical_slash")
@dataclass
class VerticalSlash(Pattern):
    """MInference vertical-slash: the last ``last_q`` queries' softmax over all keys; verticals = the ``vertical``
    key columns with the largest summed attention (the first 30 forced), slashes = the ``slash`` diagonals with the
    largest summed attention (the last 100, i.e. the local band, forced). Executed at block granularity: a block is
    computed if a chosen column or diagonal passes through it (a superset of MInference's mixed sparse kernel, which
    gathers single columns). ``backend``: how the probe rows' column and diagonal sums are computed
    (``column_probs``: a Triton kernel by default on CUDA, "reference" for torch)."""

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    force_vertical: int = 30
    force_slash: int = 100
    backend: str = "auto"
    at_least: ClassVar[dict] = {"vertical": 0, "slash": 0, "last_q": 1, "force_vertical": 0, "force_slash": 0}

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        nq, nk = q.shape[2], k.shape[2]
        off = nk - nq
        lq = min(self.last_q, nq)
        qpos = torch.arange(nq - lq, nq, device=q.device) + off
        vert, slash = column_probs(q[:, :, nq - lq:], k, qpos, diagonal_first=nq - lq + off, backend=self.backend)
        if use_kernel(self.backend, q) and os.environ.get("VIDSPARSE_VS_LAYOUT") != "0":
            from ..kernels.vs_layout import supported, vertical_slash_layout

            if supported(meta.block_k):  # the selections and the mask-to-layout steps below in two launches
                index, count, full = vertical_slash_layout(
                    vert, slash, self.vertical, self.slash, self.force_vertical, self.force_slash, meta.block_q,
                    meta.block_k, nq, nk, meta.causal)
                return BlockLayout(index, count, full, meta.block_q, meta.block_k, nq, nk, meta.causal)
        vert[..., : self.force_vertical] = float("inf")  # [B, H, Nk]
        slash[..., : self.force_slash] = float("inf")
        v_keep = (keep_topk(vert, min(self.vertical, nk)) if self.vertical > 0
                  else torch.zeros_like(vert, dtype=torch.bool))
        s_keep = keep_topk(slash, min(self.slash, nk))
        return lines_layout(v_keep, s_keep, meta, nq, nk)


def lines_layout(v_keep, s_keep, meta: SeqMeta, nq: int, nk: int) -> BlockLayout:
    """The layout of the blocks that a kept key column (``v_keep`` bool [B, H, Nk]) or a kept diagonal offset
    (``s_keep`` bool [B, H, Nk], offset o = position − key) passes through, inside the causal triangle."""
    b, h, _ = v_keep.shape
    nqb, nkb = -(-nq // meta.block_q), -(-nk // meta.block_k)
    cols, lo_c, hi_c = _block_geometry(nq, nk, meta.block_q, meta.block_k, v_keep.device)
    # Vertical column c -> every query block, key block c // bk.
    vb = torch.zeros(b, h, nkb, device=v_keep.device).scatter_add_(-1, cols.expand(b, h, nk), v_keep.float()) > 0
    # Slash offsets kept in [lo, hi] through a block: a difference of the kept offsets' running count.
    csum = torch.cat([torch.zeros(b, h, 1, device=v_keep.device), s_keep.float().cumsum(-1)], -1)
    run = csum[:, :, None].expand(b, h, nqb, nk + 1)
    hits = torch.gather(run, -1, hi_c.expand(b, h, nqb, nkb)) - torch.gather(run, -1, lo_c.expand(b, h, nqb, nkb))
    keep = (hits > 0) | vb[:, :, None, :]
    return BlockLayout.from_block_mask(keep, meta.block_q, meta.block_k, nq, nk, meta.causal, width=nkb)


@shape_cache()
def _block_geometry(nq: int, nk: int, block_q: int, block_k: int, device):
    """The estimate's shape-only tensors (cached per shape and device: every layer asks for the same): each key's
    block int64 [Nk]; and per (query block m, key block n), the bounds of the slash offsets o that pass through the
    block — a slash at offset o covers key positions [m·bq − o, (m+1)·bq − 1 − o] (+ Nk − Nq) of query block m — as
    positions into the kept offsets' running count: lo int64 [NQ, NK] (the smallest such o, clamped to [0, Nk]) and hi
    (the largest plus one, clamped)."""
    off = nk - nq
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    cols = torch.arange(nk, device=device) // block_k
    m = torch.arange(nqb, device=device)[:, None]
    n = torch.arange(nkb, device=device)[None, :]
    lo_o = m * block_q + off - (n + 1) * block_k + 1  # smallest offset reaching block n from block m
    hi_o = (m + 1) * block_q - 1 + off - n * block_k  # largest offset
    return cols, lo_o.clamp(0, nk), (hi_o + 1).clamp(0, nk)
