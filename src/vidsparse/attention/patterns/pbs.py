"""``pbs``: Permuted Block-Sparse attention (xinghaow99/pbs-attn)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout, PermutedLayout, gather_rows, shape_cache
from .base import Pattern, SeqMeta, block_scores, column_probs, keep_top_mass, pool_blocks, use_kernel


@PATTERNS.register("pbs")
@dataclass
class PBS(Pattern):
    """Keys are reordered inside each ``segment``-token segment by the attention the last ``last_q`` queries pay
    them (per K/V head, summed over its query heads), so the keys that many queries want gather in a few blocks;
    then, per query block, the past segments' permuted blocks are chosen like ``block_cdf`` (pooled-softmax mass
    ``tau``) and the segment(s) holding the query block's own positions are computed whole, with the causal mask
    taken from each key's original position. The block holding token 0 is always kept. Queries are not permuted."""

    segment: int = 1024
    tau: float = 0.9
    last_q: int = 128
    first_block: bool = True
    backend: str = "auto"  # the probe rows' column sums and the pooled scores: Triton kernels on CUDA, or "reference"

    at_least: ClassVar[dict] = {"segment": 1, "last_q": 1}
    fractions: ClassVar[tuple] = ("tau",)

    def key_scores(self, q, k) -> torch.Tensor:
        """float32 [B, Hkv, Nk]: the attention each key collects from the last ``last_q`` queries of its K/V head's
        query heads."""
        b, h, nq, _ = q.shape
        hk, nk = k.shape[1], k.shape[2]
        lq = min(self.last_q, nq)
        qpos = torch.arange(nq - lq, nq, device=q.device) + (nk - nq)
        return column_probs(q[:, :, nq - lq:], k, qpos, backend=self.backend)[0].view(b, hk, h // hk, nk).sum(2)

    def permutation(self, q, k) -> torch.Tensor:
        """int64 [B, Hkv, Nk]: original key positions in permuted order (on CUDA each segment sorted by one Triton
        program, ``kernels.gather.segment_order``; ``VIDSPARSE_PBS_SORT=0``: torch's sort)."""
        score = self.key_scores(q, k)
        if use_kernel(self.backend, q) and os.environ.get("VIDSPARSE_PBS_SORT") != "0":
            from ..kernels.gather import SORT_UP_TO
            from ..kernels.gather import segment_order as kernel

            if min(self.segment, score.shape[-1]) <= SORT_UP_TO:
                return kernel(score, self.segment)
        return segment_order(score, self.segment)

    def estimate(self, q, k, meta: SeqMeta) -> PermutedLayout:
        """On CUDA (``backend`` "auto"), the segments are sorted by ``kernels.gather.segment_order``, the permuted
        keys' block means come from ``kernels.gather.pool_rows`` (no copy of the permuted keys) and the blocks from
        one ``select_mass`` pass with the own segments and the first block forced; ``VIDSPARSE_PBS_SORT=0`` /
        ``VIDSPARSE_PBS_POOL_ROWS=0`` / ``VIDSPARSE_PBS_SELECT=0`` take the torch steps (the same layout:
        ``tests/test_attention.py``). H200, 16K tokens, GPU ms of the whole estimate, each switch off/on with the
        others on (``benchmarks/profile_estimation.py --n 16384 --kv-heads 4 --specs pbs --env-ab
        VIDSPARSE_PBS_SELECT=0,1``, 2026-11-29, ``benchmarks/results/nvidia-h200/profile_estimation_s114_*``):
        SELECT 0.358/0.249 (28/4), 0.431/0.322 (28/28), at 32K 0.716/0.438 (28/4); POOL_ROWS 0.257/0.250 and
        0.368/0.322; SORT 0.269/0.250 and 0.325/0.322. All three off, 28/28: 0.479 ms. The estimate is 7.4% (28/4)
        and 9.1% (28/28) of its kernel's time at 16K (``--with-kernel``), from 11.3% and 13.5% before."""
        if self.segment % meta.block_k:
            from ...errors import SpecError

            raise SpecError(f"pbs segment {self.segment} is not a multiple of the key block {meta.block_k}: "
                            f"use pbs:segment={max(1, self.segment // meta.block_k) * meta.block_k}")
        b, h, nq, _ = q.shape
        hk, nk = k.shape[1], k.shape[2]
        perm = self.permutation(q, k)
        if use_kernel(self.backend, q) and os.environ.get("VIDSPARSE_PBS_POOL_ROWS") != "0":
            from ..kernels.gather import pool_rows

            kp = pool_rows(k, perm, meta.block_k)  # the permuted keys' block means, without their copy
        else:
            kp = pool_blocks(gather_rows(k, perm), meta.block_k)
        s = block_scores(q, k, SeqMeta(meta.block_q, meta.block_k, False), kp=kp, backend=self.backend)
        nqb, nkb = s.shape[-2:]
        past, own, bias = _segments(nqb, nkb, meta.block_q, meta.block_k, nq, nk, self.segment, meta.causal, q.device)
        probs = torch.softmax(s + bias, -1).nan_to_num(0.0)  # 0 outside the past segments
        where0 = torch.argmax((perm == 0).int(), -1) // meta.block_k  # [B, Hkv]: the block token 0 was permuted to
        if use_kernel(self.backend, q) and os.environ.get("VIDSPARSE_PBS_SELECT") != "0":
            from ..kernels.block_select import select_mass

            # the mass selection, the own segments and the first block in one pass that writes the layout
            first = where0 if self.first_block else torch.full_like(where0, -1)  # -1: no block
            index, count, full = select_mass(probs, self.tau, 0, 0, meta.block_q, meta.block_k, nq, nk, False,
                                             extra=own, first=first)
            lay = BlockLayout(index, count, full, meta.block_q, meta.block_k, nq, nk, False)
            return PermutedLayout(perm, lay, causal=meta.causal)
        keep = (keep_top_mass(probs, self.tau) & past) | own
        if self.first_block:  # the permuted block that holds token 0, for every query head of its K/V head
            keep = keep | (torch.arange(nkb, device=q.device) == where0.repeat_interleave(h // hk, 1)[..., None, None])
        lay = BlockLayout.from_block_mask(keep, meta.block_q, meta.block_k, nq, nk, causal=False, width=nkb)
        return PermutedLayout(perm, lay, causal=meta.causal)


def segment_order(score: torch.Tensor, segment: int) -> torch.Tensor:
    """The positions of each ``segment``-long run of ``score`` [..., Nk] (the last run may be shorter), by score
    descending within the run, ties to the lower position, runs in order: int64 [..., Nk]. One sort of each run's
    ``segment`` scores: the result of sorting all Nk scores and then stably by segment (the two sorts it replaced),
    4–5× faster on an H200 (``benchmarks/pbs_steps.py``)."""
    nk = score.shape[-1]
    segment = max(1, min(segment, nk))  # one run of them all: no padding past Nk
    runs = -(-nk // segment)
    padded = torch.nn.functional.pad(score, (0, runs * segment - nk), value=float("-inf"))  # sorts last in the last run
    order = torch.argsort(padded.view(*score.shape[:-1], runs, segment), dim=-1, descending=True, stable=True)
    order += torch.arange(0, runs * segment, segment, device=score.device)[:, None]
    return order.view(*score.shape[:-1], runs * segment)[..., :nk]


@shape_cache()
def _segments(nqb, nkb, block_q, block_k, nq, nk, segment, causal, device):
    """Shape-only (``shape_cache``: built once per shape, not in every layer): per (query block, permuted key block)
    bool [NQ, NK] ``past`` (the block's segment lies wholly before the query block: every key visible to every
    query) and ``own`` (the segment(s) the query block's positions fall in, computed whole), and the float32 bias
    that leaves the past blocks' scores and sets the others to -inf before the softmax."""
    m = torch.arange(nqb, device=device)[:, None]
    n = torch.arange(nkb, device=device)[None, :]
    off = nk - nq
    first_q = m * block_q + off
    last_q = torch.clamp((m + 1) * block_q - 1, max=nq - 1) + off
    seg_lo = (n * block_k // segment) * segment  # original positions a permuted block spans
    seg_hi = torch.clamp(seg_lo + segment, max=nk) - 1
    if causal:
        past = seg_hi <= first_q
        own = ~past & (seg_lo <= last_q)
    else:
        own = (seg_lo <= last_q) & (seg_hi >= first_q)
        past = ~own
    bias = torch.zeros(nqb, nkb, device=device).masked_fill(~past, float("-inf"))
    return past, own, bias
