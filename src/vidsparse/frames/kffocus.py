"""``kffocus``: codec-informed novelty (KFFocus-style) without decoding a frame. Each candidate's novelty is the
bytes of the video packets shown in its interval, relative to the median (a P-frame's size tracks how much changed);
an encoder-placed key frame that breaks the regular GOP cadence marks a cut and counts as maximal novelty.

Frames: inverse-transform sampling on a mix of novelty and a uniform floor (``floor`` = 0.3 keeps coverage of static
stretches); duplicates are refilled by novelty. Tokens per frame ∝ novelty^0.5 within [``min_tokens``, 768] under
the token budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import FRAMES
from .base import FrameSelector, allocate_tokens, fill_unique, minmax


def novelty(index) -> np.ndarray:
    """float [T] in [0, 1]: packet bytes per candidate interval (min-max normalised), cuts set to 1."""
    pk = index.packets
    edges = np.concatenate([index.times, [index.times[-1] + 1.0 / index.fps]])
    slot = np.clip(np.searchsorted(edges, pk.pts_s, side="right") - 1, 0, len(index) - 1)
    size = np.where(pk.is_key, 0, pk.size).astype(np.float64)  # key frames are big by construction, not by change
    per = np.bincount(slot, weights=size, minlength=len(index))
    count = np.maximum(np.bincount(slot, minlength=len(index)), 1)
    nov = minmax(per / count)
    keys = np.nonzero(pk.is_key)[0]
    if len(keys) > 2:
        gaps = np.diff(pk.pts_s[keys])
        regular = np.median(gaps)
        early = keys[1:][gaps < 0.9 * regular]  # a key frame sooner than the GOP cadence: the encoder saw a cut
        nov[slot[early]] = 1.0
    return nov


@FRAMES.register("kffocus", query="none")
@dataclass
class KFFocus(FrameSelector):
    floor: float = 0.3
    min_tokens: int = 64

    def select(self, index, budget, scores=None):
        notes: list[str] = []
        n = self._count(index, budget, notes)
        cs = self._scores(index, scores, required=False)
        nov = novelty(index)
        t = len(index)
        w = (1 - self.floor) * nov / max(nov.sum(), 1e-12) + self.floor / t
        cdf = np.cumsum(w) / w.sum()
        picks = np.minimum(np.searchsorted(cdf, (np.arange(n) + 0.5) / n), t - 1)
        chosen = np.sort(fill_unique(picks, n, t, priority=np.argsort(-nov, kind="stable")))
        tokens = allocate_tokens(np.sqrt(nov[chosen] + 0.05), budget.token_total, lo=min(self.min_tokens, budget.token_total // n))
        if cs is not None:
            cs.get(chosen)
        return self._finish(index, chosen, tokens, cs, notes)
