"""Scorers: query -> per-candidate relevance in [0, 1], one file each; ``SCORERS`` imports them on first use."""

from .base import CandidateScores, CombinedScorer, Scorer

__all__ = ["CandidateScores", "CombinedScorer", "Scorer"]
