"""``token_sparse`` (Token Sparse Attention): per head, drop the tokens the last ``window`` queries attend to least,
up to ``1 − coverage`` of their attention mass, and run dense attention on the rest (gather, dense kernel, scatter).

Scores: softmax(q·kᵀ/√D) of the last ``window`` queries (causal), averaged over them — per query head (GQA heads
share keys but not scores). Never dropped: the last ``window`` tokens (they produce the next token's context), the
first ``sink`` tokens, and — when the sequence metadata marks a visual span — every text token. Returns a
``TokenLayout``; ``Pipeline`` applies it from layer ``from_layer`` on (the paper keeps early layers dense)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import TokenLayout, cached_arange
from .base import Pattern, SeqMeta, column_probs, use_kernel


@PATTERNS.register("token_sparse", returns="tokens")
@dataclass
class TokenSparse(Pattern):
    coverage: float = 0.95
    window: int = 128
    sink: int = 4
    from_layer: int = 2
    backend: str = "auto"  # Triton kernels on CUDA (the window's column sums, ``column_probs``; the selection,
    # ``kernels.token_select``), or "reference" (torch)

    at_least: ClassVar[dict] = {"window": 1, "from_layer": 0}
    fractions: ClassVar[tuple] = ("coverage",)

    def scores(self, q, k) -> torch.Tensor:
        """float32 [B, H, N]: mean softmax weight each key gets from the last ``window`` queries."""
        return self._mass(q, k) / min(self.window, q.shape[2])

    def _mass(self, q, k) -> torch.Tensor:
        """float32 [B, H, N]: the softmax weight each key gets from the last ``window`` queries, summed."""
        n = q.shape[2]
        w = min(self.window, n)
        return column_probs(q[:, :, n - w:], k, cached_arange(n - w, n, q.device, torch.int32),
                            backend=self.backend)[0]

    def estimate(self, q, k, meta: SeqMeta) -> TokenLayout:
        """The selection keeps the lightest tokens within a fraction of the total, so it takes the window's summed
        weights (``scores`` times the window, one launch fewer); the positions of the window's rows are cached per
        shape (two fewer)."""
        n = q.shape[2]
        raw = self._mass(q, k)
        select = drop_light_reference
        if use_kernel(self.backend, q) and os.environ.get("VIDSPARSE_TOKSEL") != "0":  # the torch path's sort,
            # scans and scatters in one Triton program per head (``VIDSPARSE_TOKSEL=0``: torch's, the A/B baseline)
            from ..kernels.token_select import drop_light as select
        index, count = select(raw, 1.0 - self.coverage, self.sink, max(0, n - self.window), meta.visual)
        return TokenLayout(index, count, n, k.shape[2], meta.causal)


def drop_light_reference(raw: torch.Tensor, frac: float, sink: int, window_start: int,
                         visual: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch selection (``kernels.token_select.drop_light``'s reference): raw float32 [B, H, N] -> (index int64
    [B, H, N]: kept positions ascending, then -1; count int64 [B, H]). Drops the droppable tokens (not the first
    ``sink``, not from ``window_start`` on, inside ``visual``) of the stable ascending sort's longest prefix whose
    cumulative sum stays within ``frac`` of the row's total."""
    b, h, n = raw.shape
    total = raw.sum(-1, keepdim=True)  # 1 up to rounding: the window queries' whole mass
    protect = torch.zeros(n, dtype=torch.bool, device=raw.device)
    protect[:sink] = True
    protect[window_start:] = True
    if visual is not None:
        s, e = visual
        protect[:s] = True
        protect[e:] = True
    cand = raw.masked_fill(protect, float("inf"))
    order = torch.argsort(cand, dim=-1, stable=True)  # least attended first, protected last
    srt = torch.gather(cand, -1, order)
    finite = torch.where(torch.isinf(srt), torch.zeros_like(srt), srt)
    # drop the longest ascending prefix whose mass stays within frac of the whole
    drop = (torch.cumsum(finite, -1) <= frac * total) & ~torch.isinf(srt)
    keep = torch.zeros_like(drop).scatter(-1, order, ~drop)
    count = keep.sum(-1)
    # compact each row's kept positions to its front (ascending) with a cumsum and a scatter: no sort, and no host
    # sync — the index keeps all N columns (-1 past the count); the executor trims it to the longest row
    slot = torch.where(keep, keep.cumsum(-1) - 1, n)
    index = torch.full((b, h, n + 1), -1, dtype=torch.long, device=raw.device)
    index.scatter_(-1, slot, torch.arange(n, device=raw.device).expand(b, h, n))  # column n: the dropped
    return index[..., :n], count
