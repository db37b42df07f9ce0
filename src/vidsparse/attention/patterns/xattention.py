"""``xattention``: XAttention's antidiagonal block scoring."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta, mass_layout, use_kernel


@PATTERNS.register("xattention")
@dataclass
class XAttention(Pattern):
    """XAttention (mit-han-lab/x-attention): keys and queries interleaved at ``stride`` S so that one GEMM gives,
    for every S×S tile, the sum along its antidiagonal; softmax over the strided scores, summed per block, then the
    smallest set of blocks reaching mass ``tau`` per query block, with sink and diagonal blocks forced. Block sizes
    must be multiples of S.

    ``backend``: "kernel" (``kernels.antidiagonal``: scores, softmax and block sums in one Triton kernel that never
    writes the score matrix, on CUDA where the strided blocks are powers of two; then ``kernels.block_select.
    select_mass`` picks the blocks; the default on CUDA) or "reference" (torch: interleaved copies of Q and K, one
    GEMM per ``chunk_tokens`` of queries, the softmax over the materialised scores, a sort for the selection)."""

    stride: int = 8
    tau: float = 0.9
    sink: int = 1
    local: int = 1
    chunk_tokens: int = 8192
    backend: str = "auto"
    at_least: ClassVar[dict] = {"stride": 1, "chunk_tokens": 1}
    fractions: ClassVar[tuple] = ("tau",)

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        s = self.stride
        if meta.block_q % s or meta.block_k % s:
            from ...errors import SpecError

            raise SpecError(f"xattention stride {s} must divide the blocks ({meta.block_q}x{meta.block_k}): "
                            "use a power of two up to 16")
        from ..kernels import antidiagonal

        if use_kernel(self.backend, q) and antidiagonal.supported(q, k, s, meta.block_q, meta.block_k):
            mass = antidiagonal.antidiagonal_block_mass(q, k, s, meta.block_q, meta.block_k, meta.causal)
        else:
            mass = self._mass_torch(q, k, meta)
        return mass_layout(mass, self.tau, q, k, meta, self.sink, self.local, self.backend)

    def _mass_torch(self, q, k, meta: SeqMeta):
        """Block masses [B, H, NQB, NKB] through materialised strided scores, ``chunk_tokens`` queries at a time."""
        s = self.stride
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
            sc = torch.baddbmm(a.new_zeros(1, 1, 1), a, kt, beta=0.0, alpha=1.0 / (math.sqrt(d) * s))
            sc = sc.view(b, h, qc.shape[2], kc.shape[2])
            blk = block_mass(sc, bq, bk, m0 * bq, -(-nk // s), (nk - nq) // s, meta.causal)
            mass.append(torch.nn.functional.pad(blk, (0, nkb - nkc)))
        return torch.cat(mass, dim=2)


def block_mass(sc, bq: int, bk: int, row0: int, col_lim: int, off_s: int, causal: bool):
    """Row softmax of strided scores sc [B, H, R, C] over the valid columns (c < ``col_lim``; causal: c ≤ row0 + r +
    ``off_s``), summed over blocks of ``bq`` rows × ``bk`` columns -> float32 [B, H, R / bq, C / bk]."""
    b, h, r, c = sc.shape
    sc = sc.float()
    cols = torch.arange(c, device=sc.device)[None, :]
    rows = torch.arange(row0, row0 + r, device=sc.device)[:, None]
    valid = cols < col_lim
    if causal:
        valid = valid & (cols <= rows + off_s)
    pr = torch.softmax(sc.masked_fill(~valid, float("-inf")), dim=-1)  # column 0 is always valid: no NaN
    return pr.view(b, h, r // bq, bq, c // bk, bk).sum((3, 5))
