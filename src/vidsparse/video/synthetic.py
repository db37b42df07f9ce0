"""Synthetic long videos with known ground truth: scene cuts, on-screen text at known times, a recurring object.

Used by the tests, the demo and the benchmarks, so that "did it find the moment" has an exact answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError

NEEDLE_TEXT = "GATE 47"
DISTRACTORS = ("EXIT 3", "MENU", "SALE 20%", "ROOM 12", "NORTH")


@dataclass
class Event:
    start: float
    end: float
    label: str

    def contains(self, t: float, slack: float = 0.0) -> bool:
        return self.start - slack <= t < self.end + slack


@dataclass
class GroundTruth:
    """Where things are in a synthetic video (seconds)."""

    duration_s: float
    fps: float
    width: int
    height: int
    scene_starts: list[float] = field(default_factory=list)
    text_events: list[Event] = field(default_factory=list)  # label = the text shown
    object_events: list[Event] = field(default_factory=list)  # label = "object"
    needle_text: str = NEEDLE_TEXT

    @property
    def needle_events(self) -> list[Event]:
        return [e for e in self.text_events if e.label == self.needle_text]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GroundTruth":
        d = dict(d)
        for key in ("text_events", "object_events"):
            d[key] = [Event(**e) for e in d.get(key, [])]
        return cls(**d)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "GroundTruth":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def _font(px: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=px)  # Pillow's bundled scalable font: the same glyphs on every machine


def render_text(text: str, height_px: int, fg=(255, 255, 255), bg=(20, 20, 20)) -> np.ndarray:
    """A text plate, uint8 [h, w, 3]: light glyphs on a dark box, as a caption or sign would appear."""
    from PIL import Image, ImageDraw

    font = _font(height_px)
    left, top, right, bottom = font.getbbox(text)
    pad = max(2, height_px // 4)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=fg, font=font)
    return np.asarray(img)


def object_sprite(size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The recurring object: a red disc with a yellow ring. Returns (rgb uint8 [s,s,3], mask bool [s,s])."""
    yy, xx = np.mgrid[:size_px, :size_px]
    r = np.hypot(yy - (size_px - 1) / 2, xx - (size_px - 1) / 2) / (size_px / 2)
    rgb = np.zeros((size_px, size_px, 3), dtype=np.uint8)
    rgb[r < 1.0] = (250, 210, 30)
    rgb[r < 0.75] = (220, 30, 40)
    return rgb, r < 1.0


def object_query_image(size_px: int = 96) -> np.ndarray:
    """What a user would pass as ``--query-image``: the object on a plain grey background."""
    rgb, mask = object_sprite(int(size_px * 0.8))
    img = np.full((size_px, size_px, 3), 128, dtype=np.uint8)
    o = (size_px - rgb.shape[0]) // 2
    img[o : o + rgb.shape[0], o : o + rgb.shape[1]][mask] = rgb[mask]
    return img


def _place_events(rng, duration, count, length_range, taken: list[tuple[float, float]], gap=5.0):
    events = []
    for _ in range(count * 50):
        if len(events) == count:
            break
        length = rng.uniform(*length_range)
        start = rng.uniform(gap, duration - length - gap)
        if all(start + length + gap <= a or start >= b + gap for a, b in taken):
            taken.append((start, start + length))
            events.append((round(start, 2), round(start + length, 2)))
    if len(events) < count:
        raise InputError(f"a {duration:.0f}s synthetic video has no room for {count} events; make it longer")
    return sorted(events)


def plan(duration_s=600.0, fps=10.0, width=320, height=180, seed=0, needles=4, distractors=6, objects=3,
         scene_len=(12.0, 45.0), text_len=(25.0, 35.0), object_len=(10.0, 20.0)) -> GroundTruth:
    """Draw the timeline of a synthetic video (no pixels yet)."""
    if duration_s <= 0 or fps <= 0 or width < 16 or height < 16:
        raise InputError("synthetic video needs duration > 0, fps > 0 and a size of at least 16x16")
    rng = np.random.default_rng(seed)
    starts, t = [0.0], 0.0
    while True:
        t += rng.uniform(*scene_len)
        if t >= duration_s - scene_len[0] / 2:
            break
        starts.append(round(t, 2))
    taken: list[tuple[float, float]] = []
    texts = [Event(a, b, NEEDLE_TEXT) for a, b in _place_events(rng, duration_s, needles, text_len, taken)]
    labels = [DISTRACTORS[i % len(DISTRACTORS)] for i in range(distractors)]
    texts += [Event(a, b, lab) for (a, b), lab in zip(_place_events(rng, duration_s, distractors, text_len, taken), labels)]
    objs = [Event(a, b, "object") for a, b in _place_events(rng, duration_s, objects, object_len, [])]
    return GroundTruth(duration_s=float(duration_s), fps=float(fps), width=int(width), height=int(height),
                       scene_starts=starts, text_events=sorted(texts, key=lambda e: e.start), object_events=objs)


def render_frames(gt: GroundTruth, seed: int = 0) -> Iterable[np.ndarray]:
    """Yield the frames of ``gt`` (uint8 [H, W, 3]) at ``gt.fps``."""
    rng = np.random.default_rng(seed + 1)
    h, w = gt.height, gt.width
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    x = np.arange(w, dtype=np.float32)
    scenes = []
    for _ in gt.scene_starts:
        # Each scene: a two-colour gradient in a random direction plus drifting stripes; cuts change all of it.
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ang = rng.uniform(0, np.pi)
        ramp = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        base = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
        scenes.append((base.astype(np.int16), rng.uniform(8, 30), rng.uniform(-0.8, 0.8), rng.uniform(0, 2 * np.pi)))
    plates = {e.label: render_text(e.label, max(10, h // 7)) for e in gt.text_events}
    sprite, mask = object_sprite(max(8, int(h * 0.45)))
    scene_starts = np.asarray(gt.scene_starts)
    n = int(round(gt.duration_s * gt.fps))
    for i in range(n):
        t = i / gt.fps
        s = int(np.searchsorted(scene_starts, t, side="right") - 1)
        base, period, speed, phase = scenes[s]
        # Vertical stripes drifting sideways: a function of x alone, so one row of values serves the frame.
        stripes = np.round(12.0 * np.sin(2 * np.pi * (x / (period * 3) + speed * t * 0.05) + phase)).astype(np.int16)
        frame = np.clip(base + stripes[None, :, None], 0, 255).astype(np.uint8)
        for e in gt.object_events:
            if e.contains(t):
                # The object drifts slowly across the frame while it is on screen.
                frac = (t - e.start) / max(e.end - e.start, 1e-6)
                y0 = (h - sprite.shape[0]) // 2
                x0 = int((w - sprite.shape[1]) * (0.15 + 0.7 * frac))
                region = frame[y0 : y0 + sprite.shape[0], x0 : x0 + sprite.shape[1]]
                region[mask] = sprite[mask]
        for e in gt.text_events:
            if e.contains(t):
                plate = plates[e.label]
                ph, pw = plate.shape[:2]
                y0 = h - ph - h // 12 if e.label == gt.needle_text else h // 12
                x0 = max(0, (w - pw) // 2)
                frame[y0 : y0 + ph, x0 : x0 + min(pw, w - x0)] = plate[:, : min(pw, w - x0)]
        yield frame


def write_video(path: str, frames: Iterable[np.ndarray], fps: float | None = None, pts_s: Sequence[float] | None = None,
                codec: str = "libx264", pix_fmt: str | None = None, gop: int | None = None,
                options: dict | None = None) -> None:
    """Encode frames (uint8 [H, W, 3]) with PyAV. Either a constant ``fps`` or explicit ``pts_s`` (variable rate).

    Writes to a temporary name and renames, so a reader never sees a half-written file."""
    import av

    if (fps is None) == (pts_s is None):
        raise ValueError("give exactly one of fps or pts_s")
    tmp = f"{path}.part{os.getpid()}{os.path.splitext(path)[1]}"
    container = av.open(tmp, mode="w")
    try:
        rate = Fraction(fps).limit_denominator(1001) if fps is not None else Fraction(30)
        stream = container.add_stream(codec, rate=rate)
        stream.pix_fmt = pix_fmt or ("yuvj444p" if codec == "mjpeg" else "yuv420p")
        opts = {"preset": "veryfast", "crf": "26"} if codec == "libx264" else {}
        opts.update(options or {})
        stream.options = opts
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts_s is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        first = True
        for i, arr in enumerate(frames):
            if first:
                stream.height, stream.width = arr.shape[:2]
                first = False
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if pts_s is not None:
                frame.pts = int(round(pts_s[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
                frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    except BaseException:
        container.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    container.close()
    os.replace(tmp, path)


def make_synthetic_video(path: str, duration_s: float = 600.0, fps: float = 10.0, width: int = 320, height: int = 180,
                         seed: int = 0, codec: str = "libx264", **plan_kwargs) -> GroundTruth:
    """Write a synthetic video to ``path`` and its ground truth to ``path + '.json'``; returns the ground truth."""
    gt = plan(duration_s, fps, width, height, seed, **plan_kwargs)
    write_video(path, render_frames(gt, seed), fps=fps, codec=codec, gop=int(round(fps * 2)))
    gt.save(path + ".json")
    return gt
