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
    chunk_tokens: int = 8192

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
        bq, bk = meta.block_q // s, meta.block_k // s
        mass = []
        # Query blocks in chunks: the strided score matrix of a whole 128K sequence would not fit.
        step = max(1, self.chunk_tokens // meta.block_q)
        for m0 in range(0, nqb, step):
            m1 = min(nqb, m0 + step)
            # Causal: key blocks past this chunk's last diagonal are never needed.
            nkc = nkb if not meta.causal else min(nkb, -(-(m1 * meta.block_q + nk - nq) // meta.block_k))
            qc = qs[:, :, m0 * bq : m1 * bq]
            kc = ks[:, :, : nkc * bk]
            # GEMM in q's dtype, the scale applied in its epilogue; then in place: mask, softmax, block sums
            a = qc.reshape(b * hk, g * qc.shape[2], s * d)
            kt = kc.reshape(b * hk, kc.shape[2], s * d).transpose(1, 2)
            sc = torch.baddbmm(a.new_zeros(1, 1, 1), a, kt, beta=0.0, alpha=1.0 / (math.sqrt(d) * s)).float()
            sc = sc.view(b, h, qc.shape[2], kc.shape[2])
            cols = torch.arange(kc.shape[2], device=q.device)[None, :]
            rows = torch.arange(m0 * bq, m1 * bq, device=q.device)[:, None]
            valid = cols * s < nk
            if meta.causal:
                valid = valid & (cols <= rows + (nk - nq) // s)
            pr = torch.softmax(sc.masked_fill_(~valid, float("-inf")), dim=-1)  # column 0 is always valid: no NaN
            blk = pr.view(b, h, m1 - m0, bq, nkc, bk).sum((3, 5))
            mass.append(torch.nn.functional.pad(blk, (0, nkb - nkc)))
        mass = torch.cat(mass, dim=2)
        keep = keep_top_mass(mass, self.tau)
        return finish_layout(keep, q, k, meta, self.sink, self.local)
