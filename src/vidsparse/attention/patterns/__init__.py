"""Attention patterns (the "decide" step), one file each; the ``PATTERNS`` registry imports them on first use."""

from .base import Pattern, SeqMeta

__all__ = ["Pattern", "SeqMeta"]
