"""``xattention``: XAttention's antidiagonal block scoring."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta, keep_top_mass, finish_layout


@PATTERNS.register("xattention")
@dataclass
class XAttention(Pattern):
    """XAttention (mit-han-lab/x-attention): keys and queries interleaved at ``stride`` S so that one GEMM gives,
    for every S×S tile, the sum along its antidiagonal; softmax over the strided scores, summed per block, then the
    smallest set of blocks reaching mass ``tau`` per query block, with sink and diagonal blocks forced. Block sizes
    must be multiples of S."""

    stride: int = 8
    tau: float = 0.9
    sink: int = 1
    local: int = 1

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        s = self.stride
        if meta.block_q % s or meta.block_k % s:
            raise ValueError(f"block sizes must be multiples of the stride {s}")
        b, h, nq, d = q.shape
        hk, nk = k.shape[1], k.shape[2]
        nqb, nkb = -(-nq // meta.block_q), -(-nk // meta.block_k)
        qp = torch.nn.functional.pad(q, (0, 0, 0, nqb * meta.block_q - nq))
        kp = torch.nn.functional.pad(k, (0, 0, 0, nkb * meta.block_k - nk))
        # Antidiagonal: row i of tile pairs q[i*S + S-1-j] with k[i'*S + j], j = 0..S-1.
        qs = torch.cat([qp[:, :, s - 1 - j :: s] for j in range(s)], dim=-1)
        ks = torch.cat([kp[:, :, j::s] for j in range(s)], dim=-1)
        g = h // hk
        sc = torch.einsum("bkgid,bkjd->bkgij", qs.view(b, hk, g, -1, s * d).float(), ks.float())
        sc = sc.reshape(b, h, qs.shape[2], ks.shape[2]) / (math.sqrt(d) * s)
        rows = torch.arange(qs.shape[2], device=q.device)[:, None]
        cols = torch.arange(ks.shape[2], device=q.device)[None, :]
        valid = cols * s < nk
        if meta.causal:
            valid = valid & (cols <= rows + (nk - nq) // s)
        sc = sc.masked_fill(~valid, float("-inf"))
        pr = torch.nan_to_num(torch.softmax(sc, dim=-1), nan=0.0)
        bq, bk = meta.block_q // s, meta.block_k // s
        mass = pr.view(b, h, nqb, bq, nkb, bk).sum((3, 5))
        keep = keep_top_mass(mass, self.tau)
        return finish_layout(keep, q, k, meta, self.sink, self.local)
