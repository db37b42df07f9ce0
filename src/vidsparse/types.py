"""Frozen dataclasses shared by every stage. Time is PTS seconds everywhere.

Arrays are numpy; shapes are given in the field comments. ``to_dict`` gives JSON-ready values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, read from its packets (never from a header's frame count)."""

    path: str
    duration_s: float  # last packet end minus first pts
    avg_fps: float  # packets / duration
    width: int
    height: int
    codec: str
    is_vfr: bool  # packet durations vary by more than 10% around the median
    start_s: float  # pts of the first video packet
    n_frames: int  # video packets counted by the probe

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class Frames:
    """Decoded frames: ``data`` uint8 [T, H, W, 3] RGB, ``pts_s`` float64 [T] (PTS seconds of each frame shown)."""

    data: np.ndarray
    pts_s: np.ndarray

    def __post_init__(self):
        if self.data.ndim != 4 or self.data.shape[-1] != 3 or self.data.dtype != np.uint8:
            raise ValueError(f"Frames.data must be uint8 [T,H,W,3], got {self.data.dtype} {self.data.shape}")
        if len(self.pts_s) != len(self.data):
            raise ValueError("Frames.pts_s must have one entry per frame")

    def __len__(self) -> int:
        return len(self.data)

    def take(self, idx) -> "Frames":
        idx = np.asarray(idx, dtype=np.int64)
        return Frames(self.data[idx], self.pts_s[idx])


@dataclass(frozen=True, eq=False)
class Query:
    """What the user looks for. Any subset of the fields may be set; ``image`` is uint8 [H, W, 3]."""

    text: str | None = None
    image: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.text and self.image is None


@dataclass(frozen=True, eq=False)
class Selection:
    """Chosen moments. ``times`` float64 [K] sorted unique PTS seconds; ``index`` int64 [K] into the candidates;
    ``tokens`` int64 [K] visual-token budget per frame (the resolution the model should use); ``scores`` float64 [K]
    (NaN where the frame was never scored); ``clips`` [(start_s, end_s), ...] where the method forms clips."""

    times: np.ndarray
    index: np.ndarray
    tokens: np.ndarray
    scores: np.ndarray
    method: str
    clips: tuple[tuple[float, float], ...] = ()
    frames_scored: int = 0
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        k = len(self.times)
        if not (len(self.index) == len(self.tokens) == len(self.scores) == k):
            raise ValueError("Selection arrays must have equal length")
        if k and np.any(np.diff(self.times) <= 0):
            raise ValueError("Selection.times must be sorted and unique")

    def __len__(self) -> int:
        return len(self.times)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "frames": [
                {"t": round(float(t), 3), "score": None if np.isnan(s) else round(float(s), 6), "tokens": int(n)}
                for t, s, n in zip(self.times, self.scores, self.tokens)
            ],
            "clips": [{"start": round(float(a), 3), "end": round(float(b), 3)} for a, b in self.clips],
            "frames_scored": int(self.frames_scored),
            "notes": list(self.notes),
        }
