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


@dataclass(frozen=True, eq=False)
class VisualTokens:
    """Visual tokens of a video after the vision tower (and projector/merger), in frame-major raster order.

    features float [N, D]; positions int64 [N, 3] = (t, h, w) grid coordinates; frame int64 [N] (0..T-1,
    non-decreasing); frame_hw int64 [T, 2] = each frame's token grid (h, w) — grids may differ between frames (Qwen2.5-VL
    resolution per frame); attention float [N] or None: attention each token receives (CLS attention where a tower has
    a CLS, mean received attention otherwise); keys float [N, Dk] or None: the tower's key vectors (VisionZip);
    motion float [N] or None: mean absolute pixel change of each token's pixels from the same pixels one token-frame
    earlier (+inf in the first frame), measured before the tower (``static_patches``)."""

    features: "object"
    positions: "object"
    frame: "object"
    frame_hw: "object"
    attention: "object" = None
    keys: "object" = None
    motion: "object" = None

    def __post_init__(self):
        n = self.features.shape[0]
        if self.features.dim() != 2 or self.positions.shape != (n, 3) or self.frame.shape != (n,):
            raise ValueError("VisualTokens: features [N, D], positions [N, 3], frame [N] required")
        if int((self.frame_hw[:, 0] * self.frame_hw[:, 1]).sum()) != n:
            raise ValueError("VisualTokens: frame_hw does not add up to N tokens")
        for name in ("attention", "keys", "motion"):
            x = getattr(self, name)
            if x is not None and x.shape[0] != n:
                raise ValueError(f"VisualTokens.{name} must have one row per token")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.frame_hw.shape[0])

    @property
    def frame_counts(self):
        """int64 [T]: tokens per frame."""
        return self.frame_hw[:, 0] * self.frame_hw[:, 1]

    def frame_means(self):
        """float32 [T, D]: mean feature of each frame."""
        import torch

        sums = torch.zeros(self.num_frames, self.features.shape[1], device=self.features.device)
        return sums.index_add_(0, self.frame, self.features.float()) / self.frame_counts.float()[:, None]

    def frame_slices(self) -> list[tuple[int, int]]:
        """[(start, end)) token range of each frame."""
        import torch

        counts = self.frame_counts.tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()
        return [(e - c, e) for c, e in zip(counts, ends)]

    @classmethod
    def from_grid(cls, features, frame_hw, attention=None, keys=None, motion=None) -> "VisualTokens":
        """Build from features in frame-major raster order and per-frame grids [(h, w), ...]."""
        import torch

        hw = torch.as_tensor(frame_hw, dtype=torch.int64).reshape(-1, 2)
        parts_t, parts_h, parts_w = [], [], []
        for t, (h, w) in enumerate(hw.tolist()):
            parts_t.append(torch.full((h * w,), t, dtype=torch.int64))
            parts_h.append(torch.arange(h).repeat_interleave(w))
            parts_w.append(torch.arange(w).repeat(h))
        pos = torch.stack([torch.cat(parts_t), torch.cat(parts_h), torch.cat(parts_w)], 1).to(features.device)
        return cls(features, pos, pos[:, 0].clone(), hw.to(features.device), attention, keys, motion)


@dataclass(frozen=True, eq=False)
class Reduction:
    """What survives a token reducer. keep_index int64 [K]: sorted unique indices into the original N (the token each
    output stands at); features float [K, D] (merged tokens carry the merged features at the position of the token they
    merged into); method: the reducer's name."""

    features: "object"
    keep_index: "object"
    source: VisualTokens
    method: str

    def __len__(self) -> int:
        return int(self.keep_index.shape[0])

    @property
    def positions(self):
        """int64 [K, 3] (t, h, w) of the kept tokens in the unreduced grid: what an adapter needs for M-RoPE."""
        return self.source.positions[self.keep_index]

    @property
    def frame(self):
        return self.source.frame[self.keep_index]
