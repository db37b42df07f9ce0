"""Packet-level probe: pts, key-frame flag and size of every video packet, without decoding a frame."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..types import VideoInfo


@dataclass(frozen=True, eq=False)
class Packets:
    """Video packets in presentation order: ``pts_s`` float64 [P], ``is_key`` bool [P], ``size`` int64 [P] bytes,
    ``duration_s`` float64 [P] (gap to the next pts; the last packet's own duration or the median gap)."""

    pts_s: np.ndarray
    is_key: np.ndarray
    size: np.ndarray
    duration_s: np.ndarray

    def __len__(self) -> int:
        return len(self.pts_s)

    @property
    def max_key_interval_s(self) -> float:
        """Longest stretch between key frames (or to the end): the most a forward decode costs before a seek wins."""
        keys = self.pts_s[self.is_key]
        if len(keys) == 0:
            return float(self.pts_s[-1] - self.pts_s[0] + self.duration_s[-1])
        edges = np.concatenate([keys, [self.pts_s[-1] + self.duration_s[-1]]])
        return float(np.max(np.diff(edges))) if len(edges) > 1 else 0.0


def open_container(path: str):
    """Open a media file with PyAV, turning every failure into an ``InputError`` that says what to do."""
    import av

    if not os.path.exists(path):
        raise InputError(f"{path}: no such file; check the path")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; give a video file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path} is empty (0 bytes); give a video file")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise InputError(f"{path} is not a readable video ({exc.strerror or exc}); check the file is a video and not truncated") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} cannot be opened as a video ({exc})") from None
    return container


_TEXT_CODECS = {"ansi", "bintext", "xbin", "idf"}  # FFmpeg renders text files as "video" through these


def video_stream(container, path: str):
    """The first real video stream (cover-art pictures and FFmpeg's text-as-video demuxers do not count)."""
    fmt = getattr(container.format, "name", "") or ""
    if fmt == "tty" or any(s.codec_context and s.codec_context.name in _TEXT_CODECS for s in container.streams.video):
        raise InputError(f"{path} is a text file, not a readable video; give a video file")
    for stream in container.streams.video:
        disp = getattr(stream, "disposition", None)
        attached = False
        if disp is not None:
            try:
                import av

                attached = bool(disp & av.stream.Disposition.attached_pic)
            except (AttributeError, TypeError):
                attached = False
        if not attached:
            return stream
    kinds = sorted({s.type for s in container.streams})
    what = f"only {', '.join(kinds)} streams" if kinds else "no streams"
    raise InputError(f"{path} has no video stream ({what}); give a file with video")


def probe(path: str) -> tuple[VideoInfo, Packets]:
    """Demux every video packet of ``path`` (no decoding). Raises ``InputError`` for anything that is not a video."""
    import av

    path = str(path)
    container = open_container(path)
    try:
        stream = video_stream(container, path)
        tb = float(stream.time_base) if stream.time_base else 0.0
        pts, keys, sizes, durs = [], [], [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
                sizes.append(packet.size)
                durs.append(packet.duration or 0)
        except av.error.FFmpegError as exc:
            if not pts:
                raise InputError(f"{path} is corrupt: no video packet could be read ({exc}); re-encode or re-download it") from None
            # A truncated tail: keep what was readable; the decode layer stops at the same place.
        codec = stream.codec_context.name if stream.codec_context else "unknown"
        width = stream.codec_context.width if stream.codec_context else 0
        height = stream.codec_context.height if stream.codec_context else 0
    finally:
        container.close()
    if not pts:
        raise InputError(f"{path} has a video stream with no frames (zero length); give a non-empty video")
    if width <= 0 or height <= 0:
        raise InputError(f"{path}: the video stream has no picture size; the file is probably corrupt")
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    pts_s = np.asarray(pts, dtype=np.float64)[order] * tb
    # Drop duplicate timestamps (broken muxers): the decoder shows one frame per pts.
    uniq = np.concatenate([[True], np.diff(pts_s) > 0])
    order, pts_s = order[uniq], pts_s[uniq]
    is_key = np.asarray(keys, dtype=bool)[order]
    size = np.asarray(sizes, dtype=np.int64)[order]
    own = np.asarray(durs, dtype=np.float64)[order] * tb
    gaps = np.diff(pts_s)
    median_gap = float(np.median(gaps)) if len(gaps) else (own[-1] if own[-1] > 0 else 0.0)
    last = own[-1] if own[-1] > 0 else median_gap
    duration_s = np.concatenate([gaps, [last]])
    total = float(pts_s[-1] - pts_s[0] + last)
    if total <= 0:
        raise InputError(f"{path} has zero duration (a single frame without timing); give a real video")
    is_vfr = False
    if len(gaps) >= 2:
        lo, hi = np.percentile(gaps, [5, 95])
        is_vfr = bool(lo <= 0 or hi / lo > 1.2)
    info = VideoInfo(
        path=os.path.abspath(path),
        duration_s=total,
        avg_fps=len(pts_s) / total,
        width=int(width),
        height=int(height),
        codec=codec,
        is_vfr=is_vfr,
        start_s=float(pts_s[0]),
        n_frames=int(len(pts_s)),
    )
    return info, Packets(pts_s=pts_s, is_key=is_key, size=size, duration_s=duration_s)
