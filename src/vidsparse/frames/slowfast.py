"""``slowfast``: Keye-VL 1.5 slow-fast encoding (query-agnostic). Frames in HSV are cut into a patch grid; a frame is
*slow* when fewer than ``same_frac`` (0.9) of its patches have cosine > ``patch_cos`` (0.7) to the same patches of
the last slow frame, else *fast*. Slow frames get s tokens and fast frames max(0.3·s, 48), with s ∈ [48, 768] the
largest that fits n_slow·s + n_fast·max(0.3·s, 48) ≤ the token budget (binary search).

The n frames are the uniform ones; the patch grid is measured on the index thumbnails (an 8×8 grid of cells, each
standing for the 28-px patches under it), which keeps the method decode-free."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, uniform_indices


def hsv_patches(thumbs: np.ndarray, grid: int = 8) -> np.ndarray:
    """float32 [T, grid², D]: HSV pixels of each grid cell, flattened and centred on mid-range (128), so that the
    cosine of unrelated cells is near 0 rather than the ~0.75 any two all-positive vectors share."""
    import cv2

    hsv = np.stack([cv2.cvtColor(np.ascontiguousarray(f[..., ::-1]), cv2.COLOR_BGR2HSV_FULL) for f in thumbs])
    t, h, w, _ = hsv.shape
    ch, cw = h // grid, w // grid
    cells = hsv[:, : ch * grid, : cw * grid].reshape(t, grid, ch, grid, cw, 3).transpose(0, 1, 3, 2, 4, 5)
    return cells.reshape(t, grid * grid, -1).astype(np.float32) - 127.5


def classify_slow(thumbs: np.ndarray, patch_cos: float = 0.7, same_frac: float = 0.9) -> np.ndarray:
    """bool [T]: True for slow frames (the first frame is always slow)."""
    p = hsv_patches(thumbs)
    p /= np.maximum(np.linalg.norm(p, axis=2, keepdims=True), 1e-6)
    slow = np.zeros(len(p), dtype=bool)
    last = None
    for i in range(len(p)):  # sequential by definition: each frame compares with the last *slow* frame
        if last is None or np.mean(np.sum(p[i] * p[last], axis=1) > patch_cos) < same_frac:
            slow[i] = True
            last = i
    return slow


def slow_tokens(n_slow: int, n_fast: int, total: int, lo: int = 48, hi: int = 768, ratio: float = 0.3) -> int:
    """Largest s in [lo, hi] with n_slow·s + n_fast·max(ratio·s, lo) ≤ total (lo when nothing fits)."""
    cost = lambda s: n_slow * s + n_fast * max(int(ratio * s), lo)
    a, b = lo, hi
    if cost(a) > total:
        return lo
    while a < b:
        mid = (a + b + 1) // 2
        a, b = (mid, b) if cost(mid) <= total else (a, mid - 1)
    return a


@FRAMES.register("slowfast", query="none")
@dataclass
class SlowFast(FrameSelector):
    patch_cos: float = 0.7
    same_frac: float = 0.9
    fast_ratio: float = 0.3
    min_tokens: int = 48
    max_tokens: int = 768

    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=False)
        chosen = uniform_indices(len(index), n)
        slow = classify_slow(index.thumbs[chosen], self.patch_cos, self.same_frac)
        s = slow_tokens(int(slow.sum()), int((~slow).sum()), budget.token_total, self.min_tokens, self.max_tokens,
                        self.fast_ratio)
        tokens = np.where(slow, s, max(int(self.fast_ratio * s), self.min_tokens))
        if cs is not None:
            cs.get(chosen)
        notes.append(f"slowfast: {int(slow.sum())} slow frames at {s} tokens, {int((~slow).sum())} fast")
        return self._finish(index, chosen, tokens, cs, notes)
