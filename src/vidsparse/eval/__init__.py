"""Evaluation: dataset loaders (published formats), metrics, resumable runs, and the frame-search harness."""

from .datasets import Dataset, Sample, load
from .harness import evaluate
from .metrics import accuracy, extract_letter, temporal_prf, temporal_summary

__all__ = ["Dataset", "Sample", "load", "evaluate", "accuracy", "extract_letter", "temporal_prf", "temporal_summary"]
