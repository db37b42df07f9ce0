"""Evaluation runs. With ``model = "none"`` frame search is evaluated alone (LV-Haystack style): each question is the
query, the recipe's selector and scorer pick ``budget.frames`` moments, and temporal precision/recall/F1 against the
annotated times (5 s) is reported with the frames scored and decoded. Question answering needs a model adapter
(issue 5) and is refused with a clear message until then."""

from __future__ import annotations

import os
import sys

from ..errors import InputError, UnsupportedError
from ..recipe import Recipe
from .datasets import load
from .metrics import temporal_summary
from .runs import Run, run_dir


def recipe_name(recipe: Recipe) -> str:
    parts = [recipe.frames or "default", recipe.scorer or "auto"]
    return "+".join(p.replace(":", "-") for p in parts)


def evaluate(bench: str, data: str, model: str, recipe: Recipe, out: str, progress: bool = False,
             limit: int | None = None, crash_after: int | None = None) -> dict:
    """Run (or resume, or skip) one configuration; returns its metrics. ``crash_after`` (tests only) stops the
    process after that many new predictions, as a kill would."""
    if model != "none":
        raise UnsupportedError("question answering needs a model adapter, which this version does not have yet; "
                               "use --model none to evaluate frame search")
    ds = load(bench, data)
    if not any(s.gt_times for s in ds.samples) and ds.samples:
        raise InputError(f"{bench} has no annotated times: with --model none only temporal search can be scored "
                         "(use lvhaystack or a needle haystack)")
    path = run_dir(out, bench, model, recipe_name(recipe), recipe.budget.frames)
    run = Run(path, {"bench": bench, "data": os.path.abspath(data), "model": model, "recipe": recipe.to_dict()})
    if run.finished:
        import json

        return json.loads(run.metrics_path.read_text())
    from ..moments import find_moments

    done = run.done()
    samples = ds.samples[:limit] if limit else ds.samples
    new = 0
    for i, s in enumerate(samples):
        if s.id in done:
            continue
        m, index = find_moments(s.video, recipe.budget, recipe.frames, query=s.question, scorer=recipe.scorer,
                                subtitles=s.subtitles if recipe.scorer is None else None, progress=False)
        # Frames decoded for this query's scoring; building the (cached, shared) index is not a per-query cost.
        row = {"id": s.id, "video": os.path.basename(s.video), "pred_times": [round(float(t), 3) for t in m.selection.times],
               "gt_times": s.gt_times, "frames_scored": m.stats["frames_scored"],
               "frames_decoded": m.stats["frames_decoded"] - index.frames_decoded, "seconds": m.stats["seconds"],
               "fields": s.fields}
        run.append(row)
        done[s.id] = row
        new += 1
        if progress and sys.stderr.isatty():
            print(f"\r{bench}: {len(done)}/{len(samples)}", end="", file=sys.stderr, flush=True)
        if crash_after is not None and new >= crash_after:
            os._exit(3)
    rows = [done[s.id] for s in samples if s.id in done]
    metrics = {"bench": bench, "model": model, "recipe": recipe.to_dict(), "temporal": temporal_summary(rows),
               "frames_scored_mean": _mean(r["frames_scored"] for r in rows),
               "frames_decoded_mean": _mean(r["frames_decoded"] for r in rows),
               "n": len(rows), "missing_videos": ds.missing}
    run.finish(metrics)
    return metrics


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
