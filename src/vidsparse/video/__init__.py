"""Video layer: probe (packets, no decode), reader (decode by PTS seconds), index (cached thumbnails), synthetic videos."""

from .index import VideoIndex, build_index, cache_dir
from .probe import Packets, probe
from .reader import VideoReader, candidate_times

__all__ = ["VideoIndex", "build_index", "cache_dir", "Packets", "probe", "VideoReader", "candidate_times"]
