"""vidsparse: long-video understanding under one token budget.

Importing the package is cheap: it patches nothing and imports no Triton, CUDA or model code."""

from .errors import InputError, ResourceError, SpecError, UnsupportedError, VidsparseError
from .recipe import Budget, Recipe
from .registry import FRAMES, PATTERNS, SCORERS, TOKENS
from .types import Frames, Query, Selection, VideoInfo

__version__ = "0.1.0"

__all__ = [
    "Budget", "Recipe", "FRAMES", "PATTERNS", "SCORERS", "TOKENS", "Frames", "Query", "Selection", "VideoInfo", "VidsparseError",
    "InputError", "ResourceError", "SpecError", "UnsupportedError", "find_moments",
]


def find_moments(*args, **kwargs):
    """See ``vidsparse.moments.find_moments`` (imported lazily)."""
    from .moments import find_moments as _fm

    return _fm(*args, **kwargs)
