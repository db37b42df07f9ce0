"""``qframe``: Q-Frame query-aware selection. Gumbel-max top-K over softmax(s / τ) — adding Gumbel noise to log
probabilities and taking the top K samples K frames without replacement — then resolution by rank: the top third
of the chosen frames at full resolution (4 units of tokens), the next third at medium (2), the rest low (1),
scaled to the token budget. Seeded, so deterministic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, allocate_tokens


@FRAMES.register("qframe", query="required")
@dataclass
class QFrame(FrameSelector):
    tau: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.tau <= 0:
            raise ValueError("tau must be positive")

    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=True)
        s = cs.all()
        logp = s / self.tau
        logp = logp - np.logaddexp.reduce(logp)
        gumbel = np.random.default_rng(self.seed).gumbel(size=len(s))
        chosen = np.argsort(-(logp + gumbel), kind="stable")[:n]
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(-s[chosen], kind="stable")] = np.arange(n)
        units = np.where(rank < -(-n // 3), 4.0, np.where(rank < -(-2 * n // 3), 2.0, 1.0))
        tokens = allocate_tokens(units, budget.token_total)
        return self._finish(index, chosen, tokens, cs, notes)
