"""``FrameSelector`` and the helpers every selector shares: budget clamping, de-duplication with refill, token
allocation, and building an exact ``Selection``."""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..recipe import Budget
from ..scoring.base import CandidateScores
from ..types import Selection

PATCH = 28  # Qwen2.5-VL: one LLM token per 28x28 pixels (14-px patches, 2x2 merge)
MAX_TOKENS_PER_FRAME = 768  # qwen-vl-utils' VIDEO_MAX_PIXELS / 28^2
MIN_TOKENS_PER_FRAME = 4


def tokens_for(height: int, width: int) -> int:
    """Visual tokens of one frame at (height, width) for a Qwen2.5-VL-style model: ceil(H/28)·ceil(W/28)."""
    return math.ceil(height / PATCH) * math.ceil(width / PATCH)


def native_tokens(info) -> int:
    return min(tokens_for(info.height, info.width), MAX_TOKENS_PER_FRAME)


class FrameSelector(ABC):
    """Chooses ``min(budget.frames, T)`` candidates of a ``VideoIndex``: sorted, unique, deterministic for a seed.

    ``scores``: a ``CandidateScores`` (lazy; searches score only what they visit), a float array [T], or None."""

    name: ClassVar[str]
    capabilities: ClassVar[dict]

    @abstractmethod
    def select(self, index, budget: Budget, scores=None) -> Selection: ...

    # Helpers --------------------------------------------------------------------------------------------------
    def _count(self, index, budget: Budget, notes: list[str]) -> int:
        if not isinstance(budget, Budget):
            raise InputError("budget must be a vidsparse.Budget")
        t = len(index)
        if t == 0:
            raise InputError("the video index has no candidates")
        if budget.frames > t:
            msg = f"budget of {budget.frames} frames exceeds the {t} candidates; using all {t}"
            warnings.warn(msg, stacklevel=3)
            notes.append(msg)
        return min(budget.frames, t)

    def _scores(self, index, scores, required: bool) -> CandidateScores | None:
        if scores is None:
            if required:
                raise InputError(f"frame selector {self.name!r} needs a query (--query TEXT or --query-image PATH)")
            return None
        if isinstance(scores, CandidateScores):
            return scores
        return CandidateScores.fixed(index, scores)

    def _even_tokens(self, index, budget: Budget, n: int) -> np.ndarray:
        per = max(MIN_TOKENS_PER_FRAME, min(budget.token_total // n, native_tokens(index.info)))
        return np.full(n, per, dtype=np.int64)

    def _finish(self, index, chosen, tokens, cs: CandidateScores | None, notes: list[str], clips=()) -> Selection:
        chosen = np.asarray(chosen, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        order = np.argsort(chosen, kind="stable")
        chosen, tokens = chosen[order], tokens[order]
        if len(np.unique(chosen)) != len(chosen):
            raise AssertionError(f"{self.name} produced duplicate frames")  # a bug, never a user error
        scores = cs.values[chosen] if cs is not None else np.full(len(chosen), np.nan)
        return Selection(times=index.times[chosen].astype(np.float64), index=chosen, tokens=tokens,
                         scores=np.asarray(scores, dtype=np.float64), method=self.name, clips=tuple(clips),
                         frames_scored=cs.frames_scored if cs is not None else 0, notes=tuple(notes))


def uniform_indices(t: int, n: int) -> np.ndarray:
    """``round(linspace(0, T-1, n))``, unique for n ≤ T."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.array([(t - 1) // 2], dtype=np.int64)
    return fill_unique(np.round(np.linspace(0, t - 1, n)).astype(np.int64), n, t)


def fill_unique(chosen, n: int, t: int, priority=None) -> np.ndarray:
    """Deduplicate ``chosen`` (keeping first occurrences) and refill to exactly ``n`` indices from ``priority``
    (candidate indices, best first; default: nearest to the already chosen spread, i.e. uniform order)."""
    seen: dict[int, None] = {}
    for c in np.asarray(chosen, dtype=np.int64).tolist():
        if 0 <= c < t and c not in seen and len(seen) < n:
            seen[c] = None
    if len(seen) < n:
        if priority is None:
            priority = np.round(np.linspace(0, t - 1, t)).astype(np.int64)
            # Prefer candidates far from those chosen so the refill spreads out.
            if seen:
                taken = np.fromiter(seen, dtype=np.int64)
                dist = np.min(np.abs(np.arange(t)[:, None] - np.sort(taken)[None]), axis=1)
                priority = np.argsort(-dist, kind="stable")
        for c in np.asarray(priority, dtype=np.int64).tolist():
            if len(seen) >= n:
                break
            if c not in seen:
                seen[c] = None
    return np.fromiter(seen, dtype=np.int64)


def allocate_tokens(weights, total: int, lo: int = MIN_TOKENS_PER_FRAME, hi: int = MAX_TOKENS_PER_FRAME) -> np.ndarray:
    """Integer tokens per frame ∝ ``weights``, each in [lo, hi], summing to at most ``total`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if total < n:
        raise InputError(f"a budget of {total} tokens cannot cover {n} frames; raise --tokens or lower --budget")
    if total < lo * n:
        return np.full(n, total // n, dtype=np.int64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if w.sum() <= 0:
        w = np.ones(n)
    total = min(total, hi * n)
    out = np.zeros(n)
    free = np.ones(n, dtype=bool)
    for _ in range(n):  # proportional shares; frames pushed past [lo, hi] are pinned there and the rest re-shared
        left = total - out[~free].sum()
        out[free] = left * w[free] / w[free].sum() if w[free].sum() > 0 else left / free.sum()
        low, high = free & (out < lo), free & (out > hi)
        if not (low.any() or high.any()):
            break
        pin = high if high.any() else low  # caps first: pinning a floor too early would starve the rest
        out[pin] = hi if high.any() else lo
        free &= ~pin
        if not free.any():
            break
    base = np.floor(out + 1e-9).astype(np.int64)
    while base.sum() > total:  # floors pinned after a cap can overshoot: take it back from the largest
        base[int(np.argmax(base))] -= int(min(base.sum() - total, base.max() - lo)) or 1
    rem = int(total - base.sum())
    for i in np.argsort(-(out - base), kind="stable"):
        if rem <= 0:
            break
        if base[i] < hi:
            base[i] += 1
            rem -= 1
    return base


def minmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)
