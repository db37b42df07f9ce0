"""Frame and clip selection. Importing this package registers every selector in ``FRAMES``."""

from . import aks, bolt, dcode, f2c, kffocus, ktv, qframe, scenes, slowfast, tstar, uniform  # noqa: F401
from .base import FrameSelector, allocate_tokens, tokens_for, uniform_indices

__all__ = ["FrameSelector", "allocate_tokens", "tokens_for", "uniform_indices"]
