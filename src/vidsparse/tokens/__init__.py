"""Visual-token reducers (after the vision tower). Importing this package registers them in ``TOKENS``."""

from . import dycoke, evs, ktv_tokens, pooling, ts_llava, visionzip  # noqa: F401
from .base import TokenReducer

__all__ = ["TokenReducer"]
