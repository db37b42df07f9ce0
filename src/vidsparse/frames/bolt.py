"""``bolt``: BOLT's inverse transform sampling (sming256/BOLT). s <- ((s - min) / max(s - min))^p, CDF of s / Σs,
indices = searchsorted(CDF, linspace(1/n, 1 - 1/n, n)).

Fixes to the reference (METHODS.md §6): n = 1 returned index T (one past the end) — clipped; duplicates (n = 2
always, peaked scores collapse) are removed and refilled from the best unused candidates, so exactly n come back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, fill_unique, uniform_indices


@FRAMES.register("bolt", query="required")
@dataclass
class Bolt(FrameSelector):
    power: float = 3.0

    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=True)
        s = cs.all()
        t = len(s)
        span = s.max() - s.min()
        if span <= 0:
            notes.append("all candidates scored equally; bolt falls back to uniform")
            chosen = uniform_indices(t, n)
        else:
            w = ((s - s.min()) / span) ** self.power
            cdf = np.cumsum(w / w.sum())
            targets = np.linspace(1.0 / n, 1.0 - 1.0 / n, n) if n > 1 else np.array([0.5])
            picks = np.minimum(np.searchsorted(cdf, targets), t - 1)
            chosen = fill_unique(picks, n, t, priority=np.argsort(-s, kind="stable"))
        return self._finish(index, chosen, self._even_tokens(index, budget, n), cs, notes)
