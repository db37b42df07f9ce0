"""``visual``: query by image with weight-free descriptors (colour histogram + low-frequency DCT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..registry import SCORERS
from ..types import Frames, Query
from ..video.descriptors import describe


@SCORERS.register("visual")
@dataclass
class VisualScorer:
    """Best cosine between the query image's descriptor and the descriptors of the whole frame and of half-size
    windows at a stride of 1/8 of the frame (25 windows), so an object that fills part of the frame is found.
    Mapped to [0, 1] as (cos - floor) / (1 - floor); ``floor`` ~ the cosine of unrelated content."""

    floor: float = 0.2
    input: ClassVar[str] = "thumbs"
    expensive: ClassVar[bool] = False
    frame_size: tuple[int, int] | None = None

    def score(self, frames: Frames, query: Query) -> np.ndarray:
        if query.image is None:
            raise InputError("the visual scorer needs a query image (--query-image PATH)")
        from PIL import Image

        data = frames.data
        t, h, w = data.shape[:3]
        wh, ww = h // 2, w // 2
        q_full = np.asarray(Image.fromarray(query.image).resize((w, h), Image.BILINEAR))
        q_win = np.asarray(Image.fromarray(query.image).resize((ww, wh), Image.BILINEAR))
        best = describe(data) @ describe(q_full[None])[0]
        sy, sx = max(1, h // 8), max(1, w // 8)
        wins = [data[:, y : y + wh, x : x + ww] for y in range(0, h - wh + 1, sy) for x in range(0, w - ww + 1, sx)]
        if wins and t:
            d = describe(np.stack(wins, 1).reshape(-1, wh, ww, 3)).reshape(t, len(wins), -1)
            best = np.maximum(best, (d @ describe(q_win[None])[0]).max(axis=1))
        return np.clip((best - self.floor) / (1.0 - self.floor), 0.0, 1.0)
