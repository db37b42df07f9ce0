"""``uniform``: ``round(linspace(0, T-1, K))`` — the baseline for every comparison."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import FRAMES
from .base import FrameSelector, uniform_indices


@FRAMES.register("uniform", query="none")
@dataclass
class Uniform(FrameSelector):
    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=False)
        chosen = uniform_indices(len(index), n)
        if cs is not None:
            cs.get(chosen)  # report the chosen frames' relevance when a query was given
        return self._finish(index, chosen, self._even_tokens(index, budget, n), cs, notes)
