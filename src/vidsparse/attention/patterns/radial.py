"""``radial``: radial-attention's temporal bands for video tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta, forced_blocks


@PATTERNS.register("radial", static=True, needs="tokens_per_frame")
@dataclass
class Radial(Pattern):
    """radial-attention (mit-han-lab): between frames at distance d (in frames), band ⌊log2 d⌋ = j keeps one key
    block in 2^j, so density halves outward; frames within ``dense_frames`` and the ``sink`` blocks stay dense.
    Needs ``meta.tokens_per_frame``; tokens outside ``meta.visual`` (text) attend densely."""

    dense_frames: int = 1
    sink: int = 1
    at_least: ClassVar[dict] = {"dense_frames": 0}

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        if not meta.tokens_per_frame:
            from ...errors import InputError

            raise InputError("the radial pattern needs tokens_per_frame in the sequence metadata")
        nq, nk, nqb, nkb = self.grid(q, k, meta)
        start, end = meta.visual or (0, nk)
        tpf = meta.tokens_per_frame
        dev = q.device
        qc = (torch.arange(nqb, device=dev) * meta.block_q + meta.block_q // 2).clamp(max=nq - 1)
        kc = (torch.arange(nkb, device=dev) * meta.block_k + meta.block_k // 2).clamp(max=nk - 1)
        qf = ((qc - start) // tpf)[:, None]
        kf = ((kc - start) // tpf)[None, :]
        d = (qf - kf).abs()
        band = torch.floor(torch.log2(d.clamp(min=1).float())).long()
        n = torch.arange(nkb, device=dev)[None, :]
        keep = (d <= self.dense_frames) | (n % (2 ** band) == 0)
        text = ~((qc >= start) & (qc < end))[:, None] | ~((kc >= start) & (kc < end))[None, :]
        keep = keep | text | forced_blocks(nqb, nkb, meta, nq, nk, self.sink, 1, dev)
        return BlockLayout.from_block_mask(keep, meta.block_q, meta.block_k, nq, nk, meta.causal, width=nkb)
