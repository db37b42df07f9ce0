"""``dcode``: D-CoDe frame selection (hukcc/D-CoDe): int(n · ``uniform_ratio``) frames uniformly, the rest added
greedily, each time the candidate with the lowest mean cosine to the selected set (the most novel).

Fixes to the reference (METHODS.md §6): n > T no longer yields duplicate indices (n is clamped to T), and a uniform
ratio of 0 starts from the most central frame instead of a NaN mean over an empty set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, uniform_indices


@FRAMES.register("dcode", query="none")
@dataclass
class DCoDe(FrameSelector):
    uniform_ratio: float = 0.85

    def __post_init__(self):
        if not 0.0 <= self.uniform_ratio <= 1.0:
            raise ValueError("uniform_ratio must be in [0, 1]")

    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=False)
        t = len(index)
        f = index.features.astype(np.float64)
        chosen = list(uniform_indices(t, max(1, int(n * self.uniform_ratio))))
        sim_sum = (f @ f[chosen].T).sum(axis=1)
        taken = np.zeros(t, dtype=bool)
        taken[chosen] = True
        while len(chosen) < n:
            mean = np.where(taken, np.inf, sim_sum / len(chosen))
            j = int(np.argmin(mean))
            chosen.append(j)
            taken[j] = True
            sim_sum += f @ f[j]
        if cs is not None:
            cs.get(chosen)
        return self._finish(index, chosen, self._even_tokens(index, budget, n), cs, notes)
