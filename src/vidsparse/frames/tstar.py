"""``tstar``: T* temporal search (mll-lab-nu/TStar) — temporal search posed as spatial search.

A score distribution P over the candidates is refined in rounds. Each round samples g = rows·cols unvisited
candidates (uniform in the first round, then drawn ∝ P + g/T from the top 25% of unvisited candidates by that
weight), lays them out as one grid and scores every cell with the scorer; the best cells' scores spread to ±5
neighbours as s / (|Δ| + 1); P is refit as normalise(sigmoid(max(1/T, spline(visited)))). The search stops when the
scored-frame budget (``search`` × T, at least one grid) is spent or when n frames already score ≥ ``stop_score``.
Output: top-n of P (scored values where known) with non-maximum suppression of radius ``nms`` candidates.

The point is frames scored per query ≪ T at equal recall; ``Selection.frames_scored`` reports it. Differences from
the reference: any ``Scorer`` replaces the object detector (cells are scored as a batch, which a scorer may tile);
sampling uses a seeded generator, so results are deterministic; the spline is a monotone PCHIP interpolant, which
cannot overshoot between visited points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, fill_unique, uniform_indices


@FRAMES.register("tstar", query="required", searches=True)
@dataclass
class TStar(FrameSelector):
    rows: int = 5
    cols: int = 5
    search: float = 0.05
    spread: int = 5
    top_cells: int = 4
    stop_score: float = 0.8
    nms: int = -1  # -1: T / (4n), at least 1
    seed: int = 0

    def __post_init__(self):
        if self.rows <= 0 or self.cols <= 0:
            raise ValueError("rows and cols must be positive")
        if not 0 < self.search <= 1:
            raise ValueError("search must be in (0, 1]")

    def select(self, index, budget, scores=None):
        from scipy.interpolate import PchipInterpolator

        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=True)
        t = len(index)
        g = min(self.rows * self.cols, t)
        limit = min(t, max(g, int(np.ceil(self.search * t))))
        rng = np.random.default_rng(self.seed)
        visited = np.zeros(t, dtype=bool)
        known = np.full(t, np.nan)  # scored values plus spread neighbour evidence
        p = np.full(t, 1.0 / t)
        rounds = 0
        while visited.sum() < limit:
            take = min(g, limit - int(visited.sum()))
            if rounds == 0:
                batch = uniform_indices(t, take)
            else:
                free = np.nonzero(~visited)[0]
                w = p[free] + g / t
                pool = free[np.argsort(-w, kind="stable")[: max(take, int(np.ceil(0.25 * len(free))))]]
                wp = p[pool] + g / t
                batch = np.sort(rng.choice(pool, size=min(take, len(pool)), replace=False, p=wp / wp.sum()))
            s = cs.get(batch)
            visited[batch] = True
            rounds += 1
            for i in batch[np.argsort(-s, kind="stable")[: self.top_cells]]:
                si = cs.values[i]
                lo, hi = max(0, i - self.spread), min(t, i + self.spread + 1)
                nb = np.arange(lo, hi)
                spread = si / (np.abs(nb - i) + 1.0)
                known[nb] = np.fmax(known[nb], spread)
            known[visited] = cs.values[visited]  # measured values override spread guesses
            xs = np.nonzero(~np.isnan(known))[0]
            fit = PchipInterpolator(xs, known[xs], extrapolate=True)(np.arange(t)) if len(xs) > 1 else np.full(t, known[xs[0]])
            p = 1.0 / (1.0 + np.exp(-np.maximum(1.0 / t, fit)))
            p /= p.sum()
            if np.sum(cs.values[visited] >= self.stop_score) >= n:
                break
        rel = p.copy()
        rel[visited] = 1.0 + cs.values[visited]  # measured relevance ranks above any estimate
        radius = self.nms if self.nms >= 0 else max(1, t // (4 * n))
        chosen, blocked = [], np.zeros(t, dtype=bool)
        for i in np.argsort(-rel, kind="stable"):
            if len(chosen) == n:
                break
            if not blocked[i]:
                chosen.append(int(i))
                blocked[max(0, i - radius) : i + radius + 1] = True
        chosen = fill_unique(chosen, n, t, priority=np.argsort(-rel, kind="stable"))
        notes.append(f"tstar: {int(visited.sum())} of {t} candidates scored in {rounds} rounds")
        return self._finish(index, chosen, self._even_tokens(index, budget, n), cs, notes)
