"""Sparse prefill attention: ``BlockLayout`` (decide) and ``sparse_attention`` (execute).

Importing this package is light: the Triton kernel is imported on first use."""

from .layout import BlockLayout
from .ops import sparse_attention

__all__ = ["BlockLayout", "sparse_attention"]
