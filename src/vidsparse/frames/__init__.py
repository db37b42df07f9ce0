"""Frame and clip selection, one file per selector; the ``FRAMES`` registry imports them on first use."""

from .base import FrameSelector, allocate_tokens, tokens_for, uniform_indices

__all__ = ["FrameSelector", "allocate_tokens", "tokens_for", "uniform_indices"]
