"""Scorers: query -> per-candidate relevance in [0, 1]. Importing this package registers them in ``SCORERS``."""

from . import clip, ocr, subtitles, visual  # noqa: F401  (registration)
from .base import CandidateScores, CombinedScorer, Scorer

__all__ = ["CandidateScores", "CombinedScorer", "Scorer"]
