"""Visual-token reducers (after the vision tower). Importing this package registers them in ``TOKENS``."""

from . import aot, dcode_tokens, dycoke, evs, fastvid, ktv_tokens, pooling, prunevid, ts_llava, visionzip  # noqa: F401
from .base import TokenReducer

__all__ = ["TokenReducer"]
