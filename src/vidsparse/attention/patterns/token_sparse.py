"""``token_sparse`` (Token Sparse Attention): per head, drop the tokens the last ``window`` queries attend to least,
up to ``1 − coverage`` of their attention mass, and run dense attention on the rest (gather, dense kernel, scatter).

Scores: softmax(q·kᵀ/√D) of the last ``window`` queries (causal), averaged over them — per query head (GQA heads
share keys but not scores). Never dropped: the last ``window`` tokens (they produce the next token's context), the
first ``sink`` tokens, and — when the sequence metadata marks a visual span — every text token. Returns a
``TokenLayout``; ``Pipeline`` applies it from layer ``from_layer`` on (the paper keeps early layers dense)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import TokenLayout
from .base import Pattern, SeqMeta, column_probs


@PATTERNS.register("token_sparse", returns="tokens")
@dataclass
class TokenSparse(Pattern):
    coverage: float = 0.95
    window: int = 128
    sink: int = 4
    from_layer: int = 2
    backend: str = "auto"  # the window's column sums: a Triton kernel on CUDA (``column_probs``), or "reference"

    at_least: ClassVar[dict] = {"window": 1, "from_layer": 0}
    fractions: ClassVar[tuple] = ("coverage",)

    def scores(self, q, k) -> torch.Tensor:
        """float32 [B, H, N]: mean softmax weight each key gets from the last ``window`` queries."""
        n = q.shape[2]
        w = min(self.window, n)
        return column_probs(q[:, :, n - w:], k, torch.arange(n - w, n, device=q.device), backend=self.backend)[0] / w

    def estimate(self, q, k, meta: SeqMeta) -> TokenLayout:
        b, h, n, _ = q.shape
        raw = self.scores(q, k)
        total = raw.sum(-1, keepdim=True)  # 1 up to rounding: the window queries' whole mass
        protect = torch.zeros(n, dtype=torch.bool, device=q.device)
        protect[: self.sink] = True
        protect[max(0, n - self.window):] = True
        if meta.visual is not None:
            s, e = meta.visual
            protect[:s] = True
            protect[e:] = True
        cand = raw.masked_fill(protect, float("inf"))
        order = torch.argsort(cand, dim=-1, stable=True)  # least attended first, protected last
        srt = torch.gather(cand, -1, order)
        finite = torch.where(torch.isinf(srt), torch.zeros_like(srt), srt)
        # drop the longest ascending prefix whose mass stays within 1 - coverage of the whole
        drop = (torch.cumsum(finite, -1) <= (1.0 - self.coverage) * total) & ~torch.isinf(srt)
        keep = torch.zeros_like(drop).scatter(-1, order, ~drop)
        count = keep.sum(-1)
        # compact each row's kept positions to its front (ascending) with a cumsum and a scatter: no sort, and no
        # host sync — the index keeps all N columns (-1 past the count); the executor trims it to the longest row
        slot = torch.where(keep, keep.cumsum(-1) - 1, n)
        index = torch.full((b, h, n + 1), -1, dtype=torch.long, device=q.device)
        index.scatter_(-1, slot, torch.arange(n, device=q.device).expand(b, h, n))  # column n: the dropped
        return TokenLayout(index[..., :n], count, n, k.shape[2], meta.causal)
