"""The ``Scorer`` protocol and ``CandidateScores``, the lazy per-candidate score table selectors read from.

A scorer maps frames and a query to relevance in [0, 1] (higher = more relevant). Selectors never call a scorer
directly: they ask ``CandidateScores`` for the candidates they want, so an expensive scorer (OCR) runs only on the
candidates a search visits, and every frame scored or decoded is counted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError
from ..types import Frames, Query


@runtime_checkable
class Scorer(Protocol):
    """``score(frames, query) -> float [T]`` in [0, 1].

    ``input``: "thumbs" (the index thumbnails suffice) or "pixels" (decode at ``frame_size`` = (h, w), None = native).
    ``expensive``: cost per frame is high (~0.1 s or more); query-aware defaults then search instead of scoring all."""

    input: ClassVar[str]
    expensive: ClassVar[bool]
    frame_size: tuple[int, int] | None

    def score(self, frames: Frames, query: Query) -> np.ndarray: ...


class CandidateScores:
    """Scores of an index's candidates for one query, computed on demand and memoised.

    ``get(idx)`` -> float64 [len(idx)]; ``all()`` scores every candidate (cheap scorers only, by intent)."""

    def __init__(self, index, scorer: Scorer, query: Query, batch: int = 64, progress=None):
        self.index, self.scorer, self.query = index, scorer, query
        self.values = np.full(len(index), np.nan)
        self.frames_scored = 0
        self.frames_decoded = 0
        self.batch = batch
        self.progress = progress

    @property
    def expensive(self) -> bool:
        return bool(getattr(self.scorer, "expensive", False))

    def get(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        todo = np.unique(idx[np.isnan(self.values[idx])])
        for start in range(0, len(todo), self.batch):
            part = todo[start : start + self.batch]
            if self.scorer.input == "thumbs":
                frames = self.index.frames.take(part)
            else:
                reader = self.index.reader
                before = reader.frames_decoded
                size = self.scorer.frame_size
                if hasattr(self.scorer, "decode_size"):
                    size = self.scorer.decode_size(self.index.info)
                frames = reader.read_at(self.index.times[part], size=size)
                frames = Frames(frames.data, self.index.times[part])
                self.frames_decoded += reader.frames_decoded - before
            s = np.asarray(self.scorer.score(frames, self.query), dtype=np.float64).reshape(-1)
            if s.shape != part.shape or not np.all(np.isfinite(s)):
                raise RuntimeError(f"scorer {type(self.scorer).__name__} returned {s.shape} scores for {len(part)} frames")
            self.values[part] = s
            self.frames_scored += len(part)
            if self.progress is not None:
                self.progress(len(part))
        return self.values[idx]

    def all(self) -> np.ndarray:
        return self.get(np.arange(len(self.index)))

    @classmethod
    def fixed(cls, index, values) -> "CandidateScores":
        """Wrap precomputed scores (float [T]) so selectors see one interface."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(index),):
            raise InputError(f"scores must have one value per candidate ({len(index)}), got {values.shape}")
        obj = cls(index, _Fixed(values), Query())
        obj.values = values.copy()
        return obj


@dataclass
class _Fixed:
    values: np.ndarray
    input: ClassVar[str] = "thumbs"
    expensive: ClassVar[bool] = False
    frame_size: tuple[int, int] | None = None

    def score(self, frames: Frames, query: Query) -> np.ndarray:  # never reached: every value is preset
        raise RuntimeError("fixed scores have no scorer")


@dataclass
class CombinedScorer:
    """Max of several scorers (each in [0, 1]): a candidate is relevant if any source says so."""

    parts: tuple
    frame_size: tuple[int, int] | None = None

    def __post_init__(self):
        self.input = "pixels" if any(p.input == "pixels" for p in self.parts) else "thumbs"
        self.expensive = any(p.expensive for p in self.parts)
        sizes = {p.frame_size for p in self.parts if p.input == "pixels"}
        self.frame_size = sizes.pop() if len(sizes) == 1 else None

    def decode_size(self, info) -> tuple[int, int] | None:
        """The largest size any pixel-reading part asks for (None = native), so each part gets what it needs."""
        sizes = [p.decode_size(info) if hasattr(p, "decode_size") else p.frame_size
                 for p in self.parts if p.input == "pixels"]
        if not sizes or any(sz is None for sz in sizes):
            return None
        return max(sizes, key=lambda hw: hw[0] * hw[1])

    def score(self, frames: Frames, query: Query) -> np.ndarray:
        return np.max(np.stack([np.asarray(p.score(frames, query), dtype=np.float64) for p in self.parts]), axis=0)


_WORD = re.compile(r"[0-9a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(a: str, b: str, fuzzy: float = 0.75) -> float:
    """F1 of word overlap; words of 3+ letters also match at difflib ratio ≥ ``fuzzy`` (one misread letter in four)."""
    import difflib

    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 0.0
    used = [False] * len(wb)
    hit = 0
    for w in wa:
        for j, v in enumerate(wb):
            if not used[j] and (w == v or (len(w) > 2 and difflib.SequenceMatcher(None, w, v).ratio() >= fuzzy)):
                used[j] = True
                hit += 1
                break
    if hit == 0:
        return 0.0
    p, r = hit / len(wa), hit / len(wb)
    return 2 * p * r / (p + r)
