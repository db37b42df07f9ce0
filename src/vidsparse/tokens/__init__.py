"""Visual-token reducers, one file each; the ``TOKENS`` registry imports them on first use."""

from .base import TokenReducer

__all__ = ["TokenReducer"]
