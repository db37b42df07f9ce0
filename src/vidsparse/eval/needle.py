"""Needle-in-a-video-haystack (V-NIAH, LongVA style) from videos the user points to.

A haystack of L frames at ``fps`` is cut from the source videos (looping over them as needed); a needle — on-screen
text, an image, or a short clip — is written over ``needle_frames`` consecutive frames starting at depth d·(L − n).
Each haystack is encoded with H.264 and annotated in LV-Haystack format (``video_id``, ``question``, ``options``,
``answer``, ``frame_indexes_video``, ``video_metadata.frame_rate``) plus ``needle_depth`` and ``haystack_frames``, so
``vidsparse eval --bench lvhaystack`` scores it and ``needle_heatmap`` draws the depth × length map."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..moments import write_atomic


@dataclass
class Needle:
    text: str | None = None
    image: str | None = None
    clip: str | None = None
    frames: int = 3  # how many consecutive haystack frames carry it
    question: str | None = None

    def __post_init__(self):
        if sum(x is not None for x in (self.text, self.image, self.clip)) != 1:
            raise InputError("give exactly one needle: --needle-text, --needle-image or --needle-clip")
        if self.frames <= 0:
            raise InputError("a needle needs at least one frame")

    def default_question(self) -> str:
        if self.text:
            return self.text
        return "Find the moment the inserted " + ("image" if self.image else "clip") + " appears."


def _source_frames(videos: Sequence[str], count: int, fps: float, size: tuple[int, int]):
    """Yield ``count`` frames (uint8 [H, W, 3]) at ``fps`` from the videos in turn, looping."""
    from ..video import VideoReader, candidate_times

    readers = [VideoReader(v) for v in videos]
    made = 0
    while made < count:
        for r in readers:
            times = candidate_times(r.info, fps)[: count - made]
            for frame in r.read_at(times, size=size).data:
                yield frame
                made += 1
            if made >= count:
                return


def _needle_frames(needle: Needle, size: tuple[int, int], fps: float) -> list[np.ndarray] | None:
    from PIL import Image

    h, w = size
    if needle.image:
        from ..moments import load_query_image

        img = np.asarray(Image.fromarray(load_query_image(needle.image)).resize((w, h), Image.BILINEAR))
        return [img] * needle.frames
    if needle.clip:
        from ..video import VideoReader, candidate_times

        r = VideoReader(needle.clip)
        data = r.read_at(candidate_times(r.info, fps), size=size).data
        return [data[i % len(data)] for i in range(needle.frames)]
    return None  # text is drawn over the haystack's own frames


def _overlay_text(frame: np.ndarray, text: str) -> np.ndarray:
    from ..video.synthetic import render_text

    h, w = frame.shape[:2]
    plate = render_text(text, max(10, h // 8))
    ph, pw = plate.shape[:2]
    pw = min(pw, w)
    out = frame.copy()
    y0, x0 = h - ph - h // 10, max(0, (w - pw) // 2)
    out[y0 : y0 + ph, x0 : x0 + pw] = plate[:, :pw]
    return out


def build_haystacks(videos: Sequence[str], out_dir: str, lengths: Sequence[int], depths: Sequence[float],
                    needle: Needle, fps: float = 1.0, size: tuple[int, int] = (360, 640)) -> list[dict]:
    """Write one haystack video per (length, depth) and ``haystack.jsonl``; returns the annotation rows."""
    if not videos:
        raise InputError("give at least one source video")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise InputError("depths must lie in [0, 1]")
    if any(n < needle.frames for n in lengths):
        raise InputError(f"every haystack must be longer than the needle ({needle.frames} frames)")
    from ..video.synthetic import write_video

    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    inserts = _needle_frames(needle, size, fps)
    rows = []
    for n in lengths:
        base = list(_source_frames(videos, n, fps, size))
        for d in depths:
            start = int(round(d * (n - needle.frames)))
            frames = list(base)
            for j in range(needle.frames):
                frames[start + j] = inserts[j] if inserts is not None else _overlay_text(base[start + j], needle.text)
            vid = f"haystack_{n}f_d{int(round(d * 100)):03d}"
            write_video(str(out / "videos" / f"{vid}.mp4"), frames, fps=fps, gop=max(1, int(fps * 2)))
            rows.append({"video_id": vid, "question": needle.question or needle.default_question(),
                         "options": [], "answer": None,
                         "frame_indexes_video": list(range(start, start + needle.frames)),
                         "video_metadata": {"frame_rate": fps}, "needle_depth": float(d), "haystack_frames": int(n)})
    write_atomic(str(out / "haystack.jsonl"), lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return rows


def needle_heatmap(run_path: str, png: str) -> np.ndarray:
    """Depth × length map of temporal recall from a run's predictions (rows carry needle_depth/haystack_frames)."""
    from ..eval.metrics import temporal_prf

    rows = [json.loads(l) for l in Path(run_path, "predictions.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "needle_depth" in r.get("fields", {})]
    if not rows:
        raise InputError(f"{run_path} has no needle-haystack predictions")
    depths = sorted({r["fields"]["needle_depth"] for r in rows})
    lengths = sorted({r["fields"]["haystack_frames"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        i, j = depths.index(r["fields"]["needle_depth"]), lengths.index(r["fields"]["haystack_frames"])
        grid[i, j] = temporal_prf(r["pred_times"], r["gt_times"])[1]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("haystack frames")
    ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=ax, label="needle recall (5 s)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    write_atomic(png, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return grid
