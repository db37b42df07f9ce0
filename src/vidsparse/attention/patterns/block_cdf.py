"""``block_cdf``: smallest set of key blocks reaching a pooled-softmax mass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import PATTERNS
from ..layout import BlockLayout
from .base import Pattern, SeqMeta, finish_layout, keep_top_mass, mass_layout, pooled_block_probs


@PATTERNS.register("block_cdf")
@dataclass
class BlockCDF(Pattern):
    """Smallest set of blocks whose pooled softmax mass reaches ``tau``, plus diagonal and sink blocks.
    ``min_cos``: like SpargeAttn, blocks whose keys are not self-similar (mean cosine to the block mean below it)
    pool badly and are never pruned (0 disables). ``backend``: the selection's, as ``base.mass_layout`` (with
    ``min_cos`` > 0 always torch). ``pool_stride``: pool every ``pool_stride``-th token of each block, as
    ``pyramid`` (0: 8 tokens of each block); the default 1 is the exact mean: fewer tokens make the pooled softmax
    sharper, so the same ``tau`` keeps fewer blocks, and at τ = 0.9 the estimate is ≤ 3% of the kernel anyway."""

    tau: float = 0.9
    sink: int = 1
    local: int = 1
    min_cos: float = 0.0
    pool_stride: int = 1
    backend: str = "auto"
    at_least: ClassVar[dict] = {"pool_stride": 0}
    fractions: ClassVar[tuple] = ("tau",)

    def __post_init__(self):
        super().__post_init__()
        if not -1.0 <= self.min_cos <= 1.0:
            raise ValueError(f"min_cos must be in [-1, 1] (a cosine; 0 disables), not {self.min_cos!r}")

    def estimate(self, q, k, meta: SeqMeta) -> BlockLayout:
        p = pooled_block_probs(q, k, meta, self.pool_stride)
        if self.min_cos <= 0:
            return mass_layout(p, self.tau, q, k, meta, self.sink, self.local, self.backend)
        keep = keep_top_mass(p, self.tau) | _dissimilar_key_blocks(k, meta, self.min_cos, q.shape[1])[..., None, :]
        return finish_layout(keep, q, k, meta, self.sink, self.local)


def _dissimilar_key_blocks(k, meta, min_cos, heads):
    b, hk, n, d = k.shape
    nb = -(-n // meta.block_k)
    kk = torch.nn.functional.pad(k.float(), (0, 0, 0, nb * meta.block_k - n)).view(b, hk, nb, meta.block_k, d)
    unit = torch.nn.functional.normalize(kk, dim=-1)
    centre = torch.nn.functional.normalize(unit.mean(3, keepdim=True), dim=-1)
    cos = (unit * centre).sum(-1).mean(-1)
    return (cos < min_cos).repeat_interleave(heads // hk, dim=1)
