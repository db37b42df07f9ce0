"""Metrics in the forms the benchmarks publish them.

Multiple choice: the answer letter extracted from a model's reply, accuracy overall and per field (duration, domain,
task type, …). Temporal search (LV-Haystack): per sample, precision = fraction of predicted times within ``tol``
seconds (5) of any ground-truth time, recall = fraction of ground-truth times within ``tol`` of any prediction, F1
their harmonic mean; averaged over samples. SSIM-F1: pairwise SSIM (11×11 Gaussian window, σ = 1.5) between
predicted and ground-truth frames; precision and recall are dataset averages of each frame's best match, F1 their
harmonic mean (the T* script fed H×W×3 frames where C×H×W was expected; here frames are converted to grey first)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

LETTERS = "ABCDEFGHIJ"

_PATTERNS = [
    re.compile(r"^\s*\(?([A-J])\)?\s*(?:[.:)\]]|$)"),  # "B", "B.", "(B)", "B) text"
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-J])\)?\b", re.I),
    re.compile(r"\b([A-J])\s*[.)]\s", re.M),
]


def extract_letter(reply: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a reply chooses, or None. Tries, in order: a leading letter, "answer is X", a lettered
    line, then an exact (case-insensitive) match of one option's text."""
    if not reply:
        return None
    n = len(options) if options else len(LETTERS)
    valid = LETTERS[:n]
    text = reply.strip()
    for pat in _PATTERNS:
        m = pat.search(text)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
    if options:
        low = text.lower()
        hits = [i for i, o in enumerate(options) if _strip_letter(o).lower() and _strip_letter(o).lower() in low]
        if len(hits) == 1:
            return valid[hits[0]]
    return None


def _strip_letter(option: str) -> str:
    return re.sub(r"^\s*\(?[A-J]\)?[.:)]\s*", "", option).strip()


def accuracy(records: Iterable[dict], by: Sequence[str] = ()) -> dict:
    """records: dicts with ``pred`` and ``answer`` letters plus the fields named in ``by``.
    Returns {"accuracy", "n", "by": {field: {value: {"accuracy", "n"}}}}."""
    records = list(records)
    out = {"accuracy": _acc(records), "n": len(records), "by": {}}
    for field in by:
        groups = defaultdict(list)
        for r in records:
            groups[str(r.get(field))].append(r)
        out["by"][field] = {k: {"accuracy": _acc(v), "n": len(v)} for k, v in sorted(groups.items())}
    return out


def _acc(records) -> float:
    return float(np.mean([r.get("pred") == r.get("answer") for r in records])) if records else 0.0


def temporal_prf(pred: Sequence[float], truth: Sequence[float], tol: float = 5.0) -> tuple[float, float, float]:
    """(precision, recall, F1) of predicted times against ground-truth times, within ``tol`` seconds."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(truth, dtype=np.float64)
    if len(p) == 0 or len(g) == 0:
        return 0.0, 0.0, 0.0
    d = np.abs(p[:, None] - g[None, :]) <= tol + 1e-9
    prec = float(d.any(1).mean())
    rec = float(d.any(0).mean())
    f1 = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return prec, rec, f1


def temporal_summary(rows: Iterable[dict], tol: float = 5.0) -> dict:
    """Per-sample averages of temporal precision, recall and F1 (rows carry ``pred_times`` and ``gt_times``)."""
    vals = [temporal_prf(r["pred_times"], r["gt_times"], tol) for r in rows]
    if not vals:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 0}
    a = np.asarray(vals)
    return {"precision": float(a[:, 0].mean()), "recall": float(a[:, 1].mean()), "f1": float(a[:, 2].mean()),
            "n": len(vals), "tolerance_s": tol}


def _grey(frames: np.ndarray) -> np.ndarray:
    f = np.asarray(frames, dtype=np.float64)
    if f.ndim == 4:  # [T, H, W, 3]
        f = f @ np.array([0.299, 0.587, 0.114])
    return f


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, data_range: float = 255.0) -> float:
    """Mean SSIM of two grey images [H, W] with an 11×11 Gaussian window (σ = 1.5), as skimage/Wang et al."""
    from scipy.ndimage import gaussian_filter

    a = a.astype(np.float64)
    b = b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    filt = lambda x: gaussian_filter(x, sigma, truncate=3.5)  # radius 5 -> an 11x11 window
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(m[5:-5, 5:-5].mean()) if min(a.shape) > 10 else float(m.mean())


def ssim_prf(pred_frames: np.ndarray, gt_frames: np.ndarray) -> tuple[float, float]:
    """Per-sample (precision, recall): mean over predicted (ground-truth) frames of the best SSIM to the other set."""
    p, g = _grey(pred_frames), _grey(gt_frames)
    if len(p) == 0 or len(g) == 0:
        return 0.0, 0.0
    s = np.array([[ssim(x, y) for y in g] for x in p])
    return float(s.max(1).mean()), float(s.max(0).mean())


def ssim_f1(per_sample: Iterable[tuple[float, float]]) -> dict:
    """Harmonic mean of the dataset-averaged SSIM precision and recall."""
    a = np.asarray(list(per_sample), dtype=np.float64).reshape(-1, 2)
    if len(a) == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n": 0}
    p, r = float(a[:, 0].mean()), float(a[:, 1].mean())
    return {"precision": p, "recall": r, "f1": 0.0 if p + r == 0 else 2 * p * r / (p + r), "n": len(a)}
