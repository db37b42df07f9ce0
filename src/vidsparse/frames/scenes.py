"""``scenes``: shot boundaries in the style of PySceneDetect's ContentDetector (and AdaptiveDetector), one
representative per scene with the frame budget spread by scene length.

Score between consecutive candidates = mean |Δ| over the H, S and V channels (OpenCV 8-bit HSV, weights 1, 1, 1).
Cut at score ≥ ``threshold`` (27) once ``min_scene_s`` has passed since the last cut (the detector's SUPPRESS filter).
Adaptive: cut where score / mean(score of the ±``window`` neighbours) ≥ ``adaptive_threshold`` (3) and score ≥
``min_content`` (15). Computed on the index thumbnails; ``tests/frames`` checks the cuts against ``scenedetect``
fed the same frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, allocate_tokens, fill_unique


def hsv_scores(thumbs: np.ndarray) -> np.ndarray:
    """float [T]: ContentDetector's frame score of each candidate against the previous one (0 for the first)."""
    import cv2

    t = len(thumbs)
    if t < 2:
        return np.zeros(t)
    # RGB -> HSV exactly as OpenCV computes it from BGR; the channels are reversed, not converted.
    hsv = np.stack([cv2.cvtColor(np.ascontiguousarray(f[..., ::-1]), cv2.COLOR_BGR2HSV) for f in thumbs]).astype(np.int32)
    delta = np.abs(np.diff(hsv, axis=0)).reshape(t - 1, -1, 3).mean(axis=1)  # [T-1, 3] per channel
    return np.concatenate([[0.0], delta.mean(axis=1)])


def scene_cuts(scores: np.ndarray, times: np.ndarray, threshold=27.0, min_scene_s=2.0, adaptive=False,
               adaptive_threshold=3.0, min_content=15.0, window=2) -> np.ndarray:
    """Indices of candidates that start a new scene (never 0)."""
    t = len(scores)
    if adaptive:
        padded = np.pad(scores.astype(np.float64), window, mode="edge")
        kernel = np.ones(2 * window + 1)
        kernel[window] = 0
        neigh = np.convolve(padded, kernel, mode="valid") / (2 * window)
        ratio = np.where(neigh > 0, scores / np.maximum(neigh, 1e-9), np.where(scores > 0, np.inf, 0.0))
        above = (ratio >= adaptive_threshold) & (scores >= min_content)
    else:
        above = scores >= threshold
    cuts, last = [], times[0] if t else 0.0
    for i in np.nonzero(above)[0]:
        if i > 0 and times[i] - last >= min_scene_s - 1e-9:
            cuts.append(i)
            last = times[i]
    return np.asarray(cuts, dtype=np.int64)


@FRAMES.register("scenes", query="none")
@dataclass
class Scenes(FrameSelector):
    threshold: float = 27.0
    min_scene_s: float = 2.0
    adaptive: bool = False
    adaptive_threshold: float = 3.0
    min_content: float = 15.0

    def scenes(self, index) -> list[tuple[int, int]]:
        """[(start, end)) candidate ranges of each scene."""
        cuts = scene_cuts(hsv_scores(index.thumbs), index.times, self.threshold, self.min_scene_s, self.adaptive,
                          self.adaptive_threshold, self.min_content)
        edges = np.concatenate([[0], cuts, [len(index)]])
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=False)
        spans = self.scenes(index)
        lengths = np.array([b - a for a, b in spans], dtype=np.float64)
        if n < len(spans):
            # Fewer frames than scenes: the longest scenes get one each.
            keep = np.sort(np.argsort(-lengths, kind="stable")[:n])
            per = np.zeros(len(spans), dtype=np.int64)
            per[keep] = 1
        else:
            per = allocate_tokens(lengths, n, lo=1, hi=int(lengths.max()))
        chosen = []
        for (a, b), k in zip(spans, per):
            if k > 0:  # centres of k equal parts of the scene
                chosen.extend(np.floor(a + (np.arange(k) + 0.5) * (b - a) / k).astype(np.int64).tolist())
        chosen = fill_unique(chosen, n, len(index))
        if cs is not None:
            cs.get(chosen)
        return self._finish(index, chosen, self._even_tokens(index, budget, n), cs, notes)
