"""``ktv``: KTV's question-agnostic keyframes (hktk07/KTV): k-means (k-means++, n_init=10) over the descriptors of
~50 uniformly pre-sampled frames, keeping the frame nearest each centroid. With a query, cosine(query, keyframe)
only *ranks* keyframes, and rank sets each frame's tokens: rank 0 gets 4 units, ranks 1–4 two, the rest one
(6 frames / 1872 tokens -> 576, 288 ×4, 144).

Differences from the reference: features are vidsparse's weight-free descriptors unless the index carries others;
the pre-sample grows to 2·K when K > 25 so k-means has points to choose from; a centroid whose nearest frame is
already taken gets the nearest unused uniform frame instead of the whole selection falling back to uniform."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, allocate_tokens, fill_unique, uniform_indices


@FRAMES.register("ktv", query="optional")
@dataclass
class KTV(FrameSelector):
    presample: int = 50
    n_init: int = 10
    seed: int = 0

    def select(self, index, budget, scores=None):
        from sklearn.cluster import KMeans

        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=False)
        t = len(index)
        pre = uniform_indices(t, min(t, max(self.presample, 2 * n)))
        x = index.features[pre].astype(np.float64)
        if n >= len(pre):
            chosen = pre[:n]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # identical frames: fewer distinct points than clusters
                km = KMeans(n_clusters=n, init="k-means++", n_init=self.n_init, random_state=self.seed).fit(x)
            d = ((km.cluster_centers_[:, None, :] - x[None]) ** 2).sum(-1)
            nearest = pre[np.argmin(d, axis=1)]
            chosen = fill_unique(nearest, n, t, priority=_uniform_first(t, n))
        if cs is not None:
            rel = cs.get(chosen)
            rank = np.empty(n, dtype=np.int64)
            rank[np.argsort(-rel, kind="stable")] = np.arange(n)
            units = np.where(rank == 0, 4.0, np.where(rank <= 4, 2.0, 1.0))
            tokens = allocate_tokens(units, budget.token_total)
        else:
            tokens = self._even_tokens(index, budget, n)
        return self._finish(index, chosen, tokens, cs, notes)


def _uniform_first(t, n):
    """Refill order for the duplicate fallback: the uniform frames first, then every other candidate."""
    uni = uniform_indices(t, n)
    rest = np.setdiff1d(np.arange(t), uni)
    return np.concatenate([uni, rest])
