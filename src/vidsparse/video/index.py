"""``VideoIndex``: the cheap, cached view of a video that frame selection works on.

Building it probes every packet and decodes thumbnails at ``fps`` (default 1). The result is cached on disk keyed by
the file's identity (absolute path, size, modification time) and the parameters, so a second query on the same video
decodes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..types import Frames, VideoInfo
from .probe import Packets, probe
from .reader import VideoReader, candidate_times

CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$VIDSPARSE_CACHE`` or ``~/.cache/vidsparse``."""
    return Path(os.environ.get("VIDSPARSE_CACHE") or Path.home() / ".cache" / "vidsparse")


@dataclass(frozen=True, eq=False)
class VideoIndex:
    """Candidates of one video: ``times`` float64 [T] (grid seconds), ``thumbs`` uint8 [T, h, w, 3], the packet probe,
    and bookkeeping of what building it cost (``frames_decoded`` = 0 on a cache hit)."""

    info: VideoInfo
    packets: Packets
    times: np.ndarray
    thumbs: np.ndarray
    fps: float
    frames_decoded: int = 0
    seconds: float = 0.0
    cache_path: str | None = None
    _reader: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.times)

    @cached_property
    def features(self) -> np.ndarray:
        """float32 [T, D] unit-norm descriptors of the thumbnails (see ``video.descriptors``)."""
        from .descriptors import describe

        return describe(self.thumbs)

    @property
    def frames(self) -> Frames:
        return Frames(self.thumbs, self.times)

    @property
    def reader(self) -> VideoReader:
        """A reader on the same file that reuses this index's probe (no second demux)."""
        if not self._reader:
            self._reader.append(VideoReader(self.info.path, _probed=(self.info, self.packets)))
        return self._reader[0]


def _key(path: str, fps: float, size: tuple[int, int]) -> str:
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{fps:.6f}|{size[0]}x{size[1]}|v{CACHE_VERSION}"
    return hashlib.sha1(ident.encode()).hexdigest()[:24]


def build_index(path: str, fps: float = 1.0, size: tuple[int, int] = (64, 64), cache: bool | str = True,
                threads: int = 0, progress: bool = False) -> VideoIndex:
    """Probe ``path`` and take thumbnails at ``fps``; ``size`` = (height, width). ``cache``: True (default dir),
    False, or a directory. ``progress`` shows a bar on a terminal."""
    path = str(path)
    t0 = time.perf_counter()
    info, packets = probe(path)  # validates the file first: a bad file never reaches the cache
    cpath = None
    if cache:
        cdir = Path(cache) if isinstance(cache, str) else cache_dir() / "index"
        cpath = cdir / f"{_key(path, fps, size)}.npz"
        if cpath.is_file():
            try:
                with np.load(cpath, allow_pickle=False) as z:
                    return VideoIndex(info=info, packets=packets, times=z["times"], thumbs=z["thumbs"], fps=fps,
                                      frames_decoded=0, seconds=time.perf_counter() - t0, cache_path=str(cpath))
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is rebuilt below
    reader = VideoReader(path, threads=threads, _probed=(info, packets))
    grid = candidate_times(info, fps)
    with _progress(progress, len(grid), f"indexing {os.path.basename(path)}") as advance:
        thumbs = reader.thumbnails(fps, size, progress=advance).data
    if cpath is not None:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, times=grid, thumbs=thumbs, meta=np.frombuffer(json.dumps(info.to_dict()).encode(), np.uint8))
            os.replace(tmp, cpath)
        except OSError:
            cpath = None  # a read-only cache directory costs speed, never the result
    idx = VideoIndex(info=info, packets=packets, times=grid, thumbs=thumbs, fps=fps,
                     frames_decoded=reader.frames_decoded, seconds=time.perf_counter() - t0,
                     cache_path=str(cpath) if cpath else None)
    idx._reader.append(reader)
    return idx


class _progress:
    """A rich progress bar on a terminal; silent in pipes and when disabled."""

    def __init__(self, enabled: bool, total: int, label: str):
        import sys

        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.label = total, label

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
