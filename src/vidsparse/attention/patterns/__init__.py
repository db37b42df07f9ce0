"""Attention patterns (the "decide" step), one file each. Importing this package registers them in ``PATTERNS``."""

from . import block_cdf, block_topk, dense, power, radial, sink_window, vertical_slash, xattention  # noqa: F401
from .base import Pattern, SeqMeta

__all__ = ["Pattern", "SeqMeta"]
