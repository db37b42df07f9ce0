"""Find the moments of a video that match a query, under a frame budget — the job behind ``vidsparse select``.

No language model is involved: probe + cached thumbnails (``video.index``), a scorer, a frame selector."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .recipe import Budget
from .registry import FRAMES, SCORERS
from .types import Query, Selection


@dataclass
class Moments:
    """What ``find_moments`` found. ``stats`` counts the work: frames decoded (index + scoring + sheet), frames scored
    by the query scorer, wall seconds."""

    video: str
    duration_s: float
    selection: Selection
    frames_spec: str
    scorer_spec: str | None
    stats: dict

    def to_dict(self) -> dict:
        sel = self.selection.to_dict()
        return {
            "video": self.video,
            "duration_s": round(self.duration_s, 3),
            "frames": sel["frames"],
            "clips": sel["clips"],
            "stats": self.stats,
            "method": {"frames": self.frames_spec, "scorer": self.scorer_spec},
            "notes": sel["notes"],
        }


def load_query_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such query image")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path} is not a readable image ({exc.__class__.__name__}); give a PNG or JPEG") from None


def default_scorer_spec(query: Query) -> str | None:
    """visual for an image query; clip when CLIP weights are configured; otherwise ocr (+ subtitles when given)."""
    from .scoring.clip import configured_path

    if query.image is not None:
        return "visual"
    if query.text:
        if configured_path():
            return "clip"
        return "ocr"
    return None


def make_scorer(spec: str | None, subtitles: str | None):
    from .scoring.base import CombinedScorer

    from .registry import parse_spec

    parts = []
    named = parse_spec(spec)[0] if spec else None
    if spec:
        parts.append(SCORERS.from_spec(spec, **({"path": subtitles} if named == "subtitles" and subtitles else {})))
    if subtitles and named != "subtitles":
        parts.append(SCORERS.from_spec("subtitles", path=subtitles))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else CombinedScorer(tuple(parts))


def default_frames_spec(scorer) -> str:
    """ktv without a query; tstar when the scorer is expensive (a search scores few frames); bolt otherwise."""
    if scorer is None:
        return "ktv"
    return "tstar" if scorer.expensive else "bolt"


def find_moments(video: str, budget: Budget | int = 32, frames: str | None = None, query: str | None = None,
                 query_image: str | np.ndarray | None = None, scorer: str | None = None, subtitles: str | None = None,
                 fps: float = 1.0, cache: bool = True, progress: bool = False):
    """Index ``video`` (cached), score candidates for the query and select ``budget.frames`` moments.

    Returns ``(Moments, VideoIndex)``; the index serves further decoding (contact sheets) without a second probe."""
    from .scoring.base import CandidateScores
    from .video.index import build_index, _progress

    t0 = time.perf_counter()
    budget = budget if isinstance(budget, Budget) else Budget(frames=budget)
    image = load_query_image(query_image) if isinstance(query_image, (str, os.PathLike)) else query_image
    q = Query(text=query or None, image=image)
    if scorer and q.empty and not scorer.startswith("subtitles"):
        raise InputError(f"scorer {scorer!r} needs a query: --query TEXT or --query-image PATH")
    if subtitles and not q.text:
        raise InputError("--subtitles needs a text query (--query TEXT)")
    scorer_spec = scorer or (default_scorer_spec(q) if not q.empty else None)
    scorer_obj = make_scorer(scorer_spec, subtitles) if not q.empty else None
    frames_spec = frames or default_frames_spec(scorer_obj)
    selector = FRAMES.from_spec(frames_spec)  # validate the spec before any decoding
    if selector.capabilities.get("query") == "required" and scorer_obj is None:
        raise InputError(f"frame selector {selector.name!r} needs a query (--query TEXT or --query-image PATH)")
    index = build_index(video, fps=fps, cache=cache, progress=progress)
    cs = None
    if scorer_obj is not None:
        # An expensive scorer reports per batch of 8; the bar's total is the search's expected share of candidates.
        with _progress(progress and scorer_obj.expensive, max(1, int(0.05 * len(index))), "scoring") as adv:
            cs = CandidateScores(index, scorer_obj, q, batch=8 if scorer_obj.expensive else 256, progress=adv)
            sel = selector.select(index, budget, cs)
    else:
        sel = selector.select(index, budget, None)
    stats = {
        "frames_decoded": int(index.frames_decoded + (cs.frames_decoded if cs else 0)),
        "frames_scored": int(cs.frames_scored if cs else 0),
        "candidates": len(index),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return Moments(video=str(video), duration_s=index.info.duration_s, selection=sel,
                   frames_spec=frames_spec, scorer_spec=scorer_spec if scorer_obj is not None else None,
                   stats=stats), index


def contact_sheet(index, selection: Selection, path: str, width: int = 240, cols: int = 4) -> int:
    """Write a PNG grid of the selected frames with their timestamps (and scores); returns frames decoded."""
    from PIL import Image, ImageDraw, ImageFont

    info = index.info
    h = max(2, round(width * info.height / info.width))
    reader = index.reader
    before = reader.frames_decoded
    frames = reader.read_at(selection.times, size=(h, width))
    n = len(frames)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    label_h = 18
    sheet = Image.new("RGB", (cols * width, rows * (h + label_h)), (16, 16, 16))
    font = ImageFont.load_default(size=13)
    draw = ImageDraw.Draw(sheet)
    for i, (img, t) in enumerate(zip(frames.data, selection.times)):
        x, y = (i % cols) * width, (i // cols) * (h + label_h)
        sheet.paste(Image.fromarray(img), (x, y + label_h))
        s = selection.scores[i]
        label = f"{_clock(t)}" + ("" if np.isnan(s) else f"  score {s:.2f}") + f"  {int(selection.tokens[i])} tok"
        draw.text((x + 4, y + 2), label, fill=(235, 235, 235), font=font)
    write_atomic(path, lambda p: sheet.save(p, format="PNG"))
    return reader.frames_decoded - before


def write_atomic(path: str, write) -> None:
    """Write via a temporary file in the same directory, then rename: a failure never leaves a damaged file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str, obj) -> None:
    write_atomic(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1) + "\n"))


def _clock(t: float) -> str:
    m, s = divmod(float(t), 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m:d}:{s:04.1f}"
