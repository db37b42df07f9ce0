"""``ocr``: text on screen (RapidOCR; detection, classification and recognition models ship in its wheel), matched
to the query by MiniLM cosine and word overlap. About 0.1–1 s a frame on two CPU cores, so it is ``expensive``:
query-aware selection then searches (``tstar``) instead of scoring every candidate."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import numpy as np

from ..errors import InputError, UnsupportedError
from ..registry import SCORERS
from ..types import Frames, Query
from .base import token_f1


@lru_cache(maxsize=4)
def _engine(max_side: int = 960):
    try:
        from rapidocr import RapidOCR
    except ImportError:
        raise UnsupportedError("the ocr scorer needs RapidOCR: pip install 'vidsparse[ocr]'") from None
    # limit_type "max": never upscale small frames to 736 px on the short side (the default), which costs ~6x
    # on 180p-360p video and reads the same lines.
    engine = RapidOCR(params={"Global.log_level": "critical", "Det.limit_type": "max", "Det.limit_side_len": max_side})
    logging.getLogger("RapidOCR").setLevel(logging.ERROR)
    return engine


def read_text(image: np.ndarray, min_confidence: float = 0.5, max_side: int = 960) -> list[tuple[str, float]]:
    """Lines of text in one RGB image (uint8 [H, W, 3]) as (text, confidence)."""
    result = _engine(max_side)(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR follows OpenCV: BGR
    txts = getattr(result, "txts", None) or ()
    scores = getattr(result, "scores", None) or ()
    return [(t, float(s)) for t, s in zip(txts, scores) if t and float(s) >= min_confidence]


@SCORERS.register("ocr")
@dataclass
class OcrScorer:
    """Score = max over lines read of confidence × (½·word-overlap F1 + ½·max(0, MiniLM cosine)) to the query text.

    ``max_side``: frames are decoded with their long side at most this; the detector never upscales."""

    min_confidence: float = 0.5
    max_side: int = 960
    input: ClassVar[str] = "pixels"
    expensive: ClassVar[bool] = True
    frame_size: tuple[int, int] | None = None
    def decode_size(self, info) -> tuple[int, int] | None:
        s = self.max_side / max(info.width, info.height)
        return None if s >= 1 else (max(1, round(info.height * s)), max(1, round(info.width * s)))

    lines_read: dict = field(default_factory=dict, init=False, repr=False)  # pts -> lines, for reports

    def score(self, frames: Frames, query: Query) -> np.ndarray:
        if not query.text:
            raise InputError("the ocr scorer needs a query text (--query TEXT)")
        from .text import similarity

        out = np.zeros(len(frames))
        for i, img in enumerate(frames.data):
            lines = read_text(img, self.min_confidence, self.max_side)
            self.lines_read[float(frames.pts_s[i])] = [t for t, _ in lines]
            if not lines:
                continue
            texts = [t for t, _ in lines]
            cos = similarity(query.text, texts)
            vals = [c * (0.5 * token_f1(t, query.text) + 0.5 * max(0.0, float(s))) for (t, c), s in zip(lines, cos)]
            out[i] = float(np.clip(max(vals), 0.0, 1.0))
        return out
