"""Decoding by PTS seconds on PyAV.

The frame shown at time ``t`` is the last frame whose pts ≤ t (the first frame for t before the start). Every caller
(CLI, index, scorers, models) goes through ``VideoReader``, so all stages agree on which picture a timestamp means.
"""

from __future__ import annotations

import os

from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..types import Frames, VideoInfo
from .probe import Packets, open_container, probe, video_stream

_EPS = 1e-6


class VideoReader:
    """Random access to the frames of one video by PTS seconds.

    ``threads``: decoder threads (0 = FFmpeg's choice, one per core). Variable frame rate is handled because only
    real pts are used, never a frame index times a nominal rate."""

    def __init__(self, path: str, threads: int = 0, _probed: tuple[VideoInfo, Packets] | None = None):
        self.path = str(path)
        self.threads = int(threads)
        self.info, self.packets = _probed if _probed is not None else probe(self.path)
        self.frames_decoded = 0  # frames converted to pixels by this reader (for stats)

    def _open(self):
        container = open_container(self.path)
        stream = video_stream(container, self.path)
        stream.thread_type = "AUTO"
        stream.thread_count = self.threads
        return container, stream

    def iter_at(self, times: Sequence[float]) -> Iterator[tuple[int, "object", float]]:
        """Yield ``(i, av.VideoFrame, pts_s)`` for each requested time in ascending time order (i indexes ``times``).

        Decodes forward from the current position unless the key frame before the next target lies ahead of it."""
        import av

        times = np.asarray(times, dtype=np.float64)
        if times.ndim != 1:
            raise InputError("timestamps must be a 1-D list of seconds")
        if len(times) == 0:
            return
        if not np.all(np.isfinite(times)):
            raise InputError("timestamps must be finite numbers of seconds")
        order = np.argsort(times, kind="stable")
        keys = self.packets.pts_s[self.packets.is_key]
        start = self.info.start_s
        container, stream = self._open()
        tb = float(stream.time_base)
        try:
            k = 0
            position = -np.inf  # pts of the last decoded frame
            decoder = None
            prev = prev_t = None
            back = 0  # extra key frames to step back when a demuxer lands late
            while k < len(order):
                target = times[order[k]]
                # Seek when the key frame at or before the target lies ahead of the decode position: decoding forward
                # would pass through it anyway, so the seek only skips work.
                ki = int(np.searchsorted(keys, target + _EPS, side="right")) - 1 - back
                key_t = keys[ki] if len(keys) and ki >= 0 else start
                if decoder is None or key_t > position + _EPS:
                    if key_t > start + _EPS or decoder is not None:
                        container.seek(max(0, int(round(key_t / tb))), stream=stream, backward=True, any_frame=False)
                    decoder = container.decode(stream)
                    prev = prev_t = None
                    position = key_t
                try:
                    frame = next(decoder)
                except StopIteration:
                    frame = None
                except av.error.FFmpegError:
                    frame = None  # a corrupt tail: serve the remaining targets with the last good frame
                if frame is None:
                    if prev is None:
                        raise InputError(f"{self.path}: no frame could be decoded near t={target:.3f}s; the file is corrupt")
                    while k < len(order):
                        yield int(order[k]), prev, prev_t
                        k += 1
                    break
                t = float(frame.pts * tb) if frame.pts is not None else position
                if prev is None and t > target + _EPS and target > start + _EPS and back < len(keys):
                    back += 1  # the demuxer landed after the target: restart one key frame earlier
                    decoder = None
                    continue
                position = t
                while k < len(order) and times[order[k]] < t - _EPS:
                    if prev is None:
                        yield int(order[k]), frame, t
                    else:
                        yield int(order[k]), prev, prev_t
                    k += 1
                    back = 0
                prev, prev_t = frame, t
                while k < len(order) and abs(times[order[k]] - t) <= _EPS:
                    yield int(order[k]), frame, t
                    k += 1
                    back = 0
        finally:
            container.close()

    def read_at(
        self,
        pts_s: Sequence[float],
        size: tuple[int, int] | None = None,
        progress: Callable[[int], None] | None = None,
        workers: int | None = None,
    ) -> Frames:
        """Frames shown at ``pts_s`` (seconds), as uint8 [T, H, W, 3] RGB in the order asked.

        ``size`` = (height, width) resizes with area interpolation when shrinking. ``Frames.pts_s`` holds the actual
        pts of each frame returned. ``workers``: decode that many contiguous stretches of the sorted targets in
        parallel, each from its own container (PyAV releases the GIL while decoding); the frames are identical to a
        sequential read. Default: up to 4 on a machine with that many cores, 1 with a ``progress`` callback or for
        fewer than 16 targets."""
        times = np.asarray(pts_s, dtype=np.float64)
        h, w = size if size is not None else (self.info.height, self.info.width)
        if h <= 0 or w <= 0:
            raise InputError(f"frame size must be positive, got {size}")
        out = np.empty((len(times), h, w, 3), dtype=np.uint8)
        actual = np.empty(len(times), dtype=np.float64)
        if workers is None:
            workers = 1 if progress is not None or len(times) < 16 else min(4, os.cpu_count() or 1)
        workers = max(1, min(int(workers), len(times) // 4 or 1))
        if workers == 1:
            self.frames_decoded += self._fill(self, times, np.arange(len(times)), out, actual, w, h, progress)
            return Frames(out, actual)
        if times.ndim != 1 or not np.all(np.isfinite(times)):
            raise InputError("timestamps must be a 1-D list of finite seconds")
        from concurrent.futures import ThreadPoolExecutor

        order = np.argsort(times, kind="stable")
        groups = [g for g in np.array_split(order, workers) if len(g)]
        readers = [VideoReader(self.path, threads=1, _probed=(self.info, self.packets)) for _ in groups]
        with ThreadPoolExecutor(len(groups)) as pool:
            counts = list(pool.map(lambda rg: self._fill(rg[0], times[rg[1]], rg[1], out, actual, w, h, None),
                                   zip(readers, groups)))
        self.frames_decoded += sum(counts)
        return Frames(out, actual)

    @staticmethod
    def _fill(reader: "VideoReader", times: np.ndarray, dest: np.ndarray, out: np.ndarray, actual: np.ndarray,
              w: int, h: int, progress) -> int:
        """Decode ``times`` with ``reader`` into ``out[dest]``; returns the pictures converted."""
        converted = 0
        last_frame, last_rgb = None, None  # one picture may serve several nearby targets
        for i, frame, t in reader.iter_at(times):
            if frame is not last_frame:
                last_frame, last_rgb = frame, _to_rgb(frame, w, h)
                converted += 1
            out[dest[i]] = last_rgb
            actual[dest[i]] = t
            if progress is not None:
                progress(1)
        return converted

    def thumbnails(self, fps: float = 1.0, size: tuple[int, int] = (64, 64), progress=None) -> Frames:
        """Frames at ``fps`` from the start, resized to ``size`` = (height, width); ``pts_s`` are the grid times."""
        grid = candidate_times(self.info, fps)
        frames = self.read_at(grid, size=size, progress=progress)
        return Frames(frames.data, grid)


def candidate_times(info: VideoInfo, fps: float) -> np.ndarray:
    """The index grid: ``start + k / fps`` for every k inside the video (at least one)."""
    if not fps > 0:
        raise InputError(f"sampling fps must be positive, got {fps}")
    n = max(1, int(np.floor(info.duration_s * fps - 1e-9)) + 1)
    grid = info.start_s + np.arange(n, dtype=np.float64) / fps
    return grid[grid < info.start_s + info.duration_s] if n > 1 else grid


def _to_rgb(frame, width: int, height: int) -> np.ndarray:
    if frame.width == width and frame.height == height:
        return frame.to_ndarray(format="rgb24")
    shrink = width < frame.width and height < frame.height
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA" if shrink else "BILINEAR").to_ndarray()
