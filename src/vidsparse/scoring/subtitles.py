"""``subtitles``: .srt cues scored against the query text (MiniLM cosine + word overlap) and mapped to time,
as Goldfish-style text retrieval does. Needs no pixels."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..registry import SCORERS
from ..types import Frames, Query
from .base import token_f1

_TIME = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})")


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def parse_srt(text: str, source: str = "subtitles") -> list[Cue]:
    """Parse SubRip text into cues sorted by start. Raises ``InputError`` when nothing parses."""
    cues = []
    for block in re.split(r"\r?\n\s*\r?\n", text.strip().lstrip("\ufeff")):
        lines = [l for l in block.strip().splitlines() if l.strip()]
        for j, line in enumerate(lines):
            if "-->" in line:
                a, _, b = line.partition("-->")
                ma, mb = _TIME.search(a), _TIME.search(b)
                if not (ma and mb):
                    raise InputError(f"{source}: malformed cue time {line.strip()!r}; expected HH:MM:SS,mmm --> HH:MM:SS,mmm")
                start, end = (int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4].ljust(3, "0")) / 1000 for m in (ma, mb))
                body = re.sub(r"<[^>]+>", "", " ".join(lines[j + 1 :])).strip()
                if end > start and body:
                    cues.append(Cue(start, end, body))
                break
    if not cues:
        raise InputError(f"{source} has no subtitle cues; give an .srt file")
    return sorted(cues, key=lambda c: c.start)


def load_srt(path: str) -> list[Cue]:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            return parse_srt(fh.read(), path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such subtitle file") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory; give an .srt file") from None


@SCORERS.register("subtitles")
@dataclass
class SubtitleScorer:
    """A frame at time t gets the best score of the cues shown within ``window_s`` of t, where a cue scores
    ½·word-overlap F1 + ½·max(0, MiniLM cosine) against the query text."""

    path: str = ""
    window_s: float = 1.0
    input: ClassVar[str] = "thumbs"
    expensive: ClassVar[bool] = False
    frame_size: tuple[int, int] | None = None
    cues: list = field(default_factory=list, init=False)
    _cue_scores: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not self.path:
            raise InputError("the subtitles scorer needs a file: subtitles:path=FILE.srt or --subtitles FILE")
        self.cues = load_srt(self.path)

    def _scores_for(self, text: str) -> np.ndarray:
        if text not in self._cue_scores:
            from .text import similarity

            cos = similarity(text, [c.text for c in self.cues])
            self._cue_scores[text] = np.array(
                [0.5 * token_f1(c.text, text) + 0.5 * max(0.0, float(s)) for c, s in zip(self.cues, cos)])
        return self._cue_scores[text]

    def score(self, frames: Frames, query: Query) -> np.ndarray:
        if not query.text:
            raise InputError("the subtitles scorer needs a query text (--query TEXT)")
        cue_s = self._scores_for(query.text)
        starts = np.array([c.start for c in self.cues]) - self.window_s
        ends = np.array([c.end for c in self.cues]) + self.window_s
        t = np.asarray(frames.pts_s, dtype=np.float64)[:, None]
        shown = (starts[None] <= t) & (t < ends[None])
        return np.clip(np.where(shown, cue_s[None], 0.0).max(axis=1, initial=0.0), 0.0, 1.0)
