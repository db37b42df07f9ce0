"""``f2c``: From Frames to Clips. Relevance r(t); candidates = local maxima of r; k-means on their times gives K
anchors (the best r in each cluster); each anchor becomes a clip of L consecutive candidates centred on it. With n
frames, K = min(``anchors``, #maxima) and L = n // K (the remainder lengthens the best anchors' clips); the
resolution comes from a ladder of short sides (448, 336, 280, 224, 168, 112 px): the largest one for which
n · tokens(H, W) ≤ the token budget, tokens(H, W) = ⌈H/28⌉·⌈W/28⌉. Overlapping clips merge; the frames they lose are
refilled from the neighbours of the best anchors, so exactly n come back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, fill_unique, tokens_for

LADDER = (448, 336, 280, 224, 168, 112)


def ladder_tokens(info, total: int, n: int) -> int:
    """Tokens per frame at the largest ladder resolution that fits ``total`` over ``n`` frames."""
    for short in LADDER:
        s = short / min(info.height, info.width)
        tok = tokens_for(max(28, round(info.height * s)), max(28, round(info.width * s)))
        if tok * n <= total:
            return tok
    return max(1, total // n)


@FRAMES.register("f2c", query="required")
@dataclass
class F2C(FrameSelector):
    anchors: int = 8
    seed: int = 0

    def select(self, index, budget, scores=None):
        from sklearn.cluster import KMeans

        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=True)
        r = cs.all()
        t = len(r)
        left = np.concatenate([[-np.inf], r[:-1]])
        right = np.concatenate([r[1:], [-np.inf]])
        maxima = np.nonzero((r >= left) & (r >= right) & ((r > left) | (r > right) | (t == 1)))[0]
        if len(maxima) == 0:
            maxima = np.array([int(np.argmax(r))])
        k = max(1, min(self.anchors, len(maxima), n))
        if k < len(maxima):
            km = KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit(maxima[:, None].astype(np.float64))
            anchors = np.array([maxima[km.labels_ == c][np.argmax(r[maxima[km.labels_ == c]])] for c in range(k)])
        else:
            anchors = maxima
        anchors = anchors[np.argsort(-r[anchors], kind="stable")]
        length = np.full(len(anchors), n // len(anchors))
        length[: n - length.sum()] += 1
        chosen, clips, near = [], [], []
        for a, L in zip(anchors, length):
            lo = int(min(max(0, a - (L - 1) // 2), max(0, t - L)))
            span = np.arange(lo, min(t, lo + L))
            chosen.extend(span.tolist())
            near.append(a)
        chosen = fill_unique(chosen, n, t, priority=_by_distance(np.asarray(near), t))
        sel = np.sort(chosen)
        # Clips: maximal runs of consecutive candidates in the selection.
        breaks = np.nonzero(np.diff(sel) > 1)[0]
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks, [len(sel) - 1]])
        step = 1.0 / index.fps
        clips = [(float(index.times[sel[a]]), float(index.times[sel[b]] + step)) for a, b in zip(starts, ends)]
        tokens = np.full(n, ladder_tokens(index.info, budget.token_total, n), dtype=np.int64)
        return self._finish(index, sel, tokens, cs, notes, clips=clips)


def _by_distance(anchors: np.ndarray, t: int) -> np.ndarray:
    """All candidates ordered by distance to the nearest anchor (ties: the better anchor comes first in ``anchors``)."""
    d = np.abs(np.arange(t)[:, None] - anchors[None]).min(axis=1)
    return np.argsort(d, kind="stable")
