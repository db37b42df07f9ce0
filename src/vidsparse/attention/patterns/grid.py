"""``grid`` (MMInference, Li et al. 2025, for video tokens): heads whose attention over the visual tokens forms a grid —
a query attends to the tokens at a fixed stride from it (the same spatial position in other frames for stride =
tokens per frame, the same column for stride = frame width) — computed on that grid only.

Decide: for each head, the last ``probe`` visual queries' softmax attention over the visual keys; a candidate stride
c captures the mass on keys with the query's phase ((j − s) mod c = (i − s) mod c). The largest candidate (tokens per
frame, then frame width) capturing at least ``tau`` of the visual mass wins; otherwise the head stays dense (one group).
Execute (``GroupLayout``): the permutation that makes each phase contiguous, one dense causal pass per phase — its
members as queries, the text before the span and its members as keys (original order is kept inside a phase, so
causality is exact) — and the members' rows written back; the text rows attend densely."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import GroupLayout, cached_arange
from .base import Pattern, SeqMeta, row_probs, use_kernel


@PATTERNS.register("grid", returns="groups", needs="visual span and tokens_per_frame")
@dataclass
class Grid(Pattern):
    tau: float = 0.6
    probe: int = 64
    stride: int = 0  # > 0: use this stride for every head (no search)
    backend: str = "auto"  # the probe rows' phase masses: a Triton kernel on CUDA ("kernel"), or torch ("reference")

    at_least: ClassVar[dict] = {"probe": 1, "stride": 0}
    fractions: ClassVar[tuple] = ("tau",)

    def captured(self, q, k, span, strides) -> torch.Tensor:
        """float32 [B, H, len(strides)]: share of the probe queries' visual attention mass on same-phase keys. On the
        kernel backend (``kernels.row_mass.phase_share``) the [B, H, probe, span] probabilities are never stored;
        the reference builds them (``row_probs``) and masks them per stride."""
        s, e = span
        if use_kernel(self.backend, q) and len(strides) <= 2:
            return self._shares(q, k, span, strides)
        rows = torch.arange(max(s, e - self.probe), e, device=q.device)
        cols = torch.arange(s, e, device=q.device)
        p = row_probs(q[:, :, rows], k[:, :, s:e], rows, cols)
        out = []
        for c in strides:
            same = ((cols[None, :] - s) % c) == ((rows[:, None] - s) % c)
            out.append((p * same).sum(-1).mean(-1))
        return torch.stack(out, -1)

    def _shares(self, q, k, span, strides, tau: float | None = None):
        """``kernels.row_mass.phase_share`` on the last ``probe`` rows of the span (a slice of q, cached positions):
        the shares, or with ``tau`` (shares, the stride each head picks)."""
        from ..kernels.row_mass import phase_share

        s, e = span
        lo = max(s, e - self.probe)
        return phase_share(q[:, :, lo:e], k[:, :, s:e], cached_arange(lo - s, e - s, q.device), tuple(strides),
                           tau=tau)

    def estimate(self, q, k, meta: SeqMeta) -> GroupLayout:
        """On the kernel backend: the statistics pass with the phases' sums (``kernels.row_mass``), then one program
        per head merges them, averages the rows' shares and picks the stride (``phase_share``); the probe rows are a
        slice of q and the positions cached, so the estimate is three launches and the group map. At 16K tokens on
        video q/k (28/28 heads, H200) that took it from 0.121 to 0.065 ms (GPU, graph replay), 9.5% → 5.3% of its
        kernels' GPU time (``profile_estimation_s130_{old,new}*``)."""
        if meta.visual is None or not meta.tokens_per_frame:
            from ...errors import InputError

            raise InputError("the grid pattern needs the visual span and tokens_per_frame in the sequence metadata")
        s, e = meta.visual
        b, h, n, _ = q.shape
        span = cached_arange(0, e - s, q.device)
        if self.stride:
            stride = torch.full((b, h), self.stride, device=q.device, dtype=torch.long)
        else:
            cands = [c for c in (meta.tokens_per_frame, (meta.frame_hw or (0, 0))[1]) if c and 1 < c < e - s]
            stride = torch.ones(b, h, dtype=torch.long, device=q.device)
            if cands and use_kernel(self.backend, q) and len(cands) <= 2:  # the shares and the choice in one launch
                stride = self._shares(q, k, (s, e), cands, tau=self.tau)[1]
            elif cands:
                cap = self.captured(q, k, (s, e), cands)  # [B, H, C]
                for ci in reversed(range(len(cands))):  # earlier candidates (larger strides) win
                    stride = torch.where(cap[..., ci] >= self.tau, torch.full_like(stride, cands[ci]), stride)
        group = span[None, None, :] % stride[..., None]
        return GroupLayout(group, (s, e), n, k.shape[2], meta.causal)
