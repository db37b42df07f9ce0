"""Evaluation runs.

With ``model = "none"`` frame search is evaluated alone (LV-Haystack style): each question is the query, the recipe's
selector and scorer pick ``budget.frames`` moments, and temporal precision/recall/F1 against the annotated times (5 s)
is reported with the frames scored and decoded.

With a model (a checkpoint directory, a cached hub id, or an already built ``Pipeline``/adapter), every multiple-choice
question is asked through ``Pipeline`` with the benchmark's options and the usual instruction to answer with the
letter; the reply's letter is scored (accuracy overall and broken down as the benchmark publishes it) and each row
keeps the run's ``RunStats`` (visual tokens, TTFT, peak memory), so efficiency and accuracy come from the same runs."""

from __future__ import annotations

import os
import sys

from ..errors import InputError
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
    if not isinstance(model, str) or model != "none":
        return evaluate_qa(bench, data, model, recipe, out, progress=progress, limit=limit, crash_after=crash_after)
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

    samples = ds.samples[:limit] if limit else ds.samples

    def predict(s):
        m, index = find_moments(s.video, recipe.budget, recipe.frames, query=s.question, scorer=recipe.scorer,
                                subtitles=s.subtitles if recipe.scorer is None else None, progress=False)
        # Frames decoded for this query's scoring; building the (cached, shared) index is not a per-query cost.
        return {"id": s.id, "video": os.path.basename(s.video),
                "pred_times": [round(float(t), 3) for t in m.selection.times], "gt_times": s.gt_times,
                "frames_scored": m.stats["frames_scored"],
                "frames_decoded": m.stats["frames_decoded"] - index.frames_decoded, "seconds": m.stats["seconds"],
                "fields": s.fields}

    done = _run_samples(run, samples, predict, bench, progress, crash_after)
    rows = [done[s.id] for s in samples if s.id in done]
    metrics = {"bench": bench, "model": model, "recipe": recipe.to_dict(), "temporal": temporal_summary(rows),
               "frames_scored_mean": _mean(r["frames_scored"] for r in rows),
               "frames_decoded_mean": _mean(r["frames_decoded"] for r in rows),
               "n": len(rows), "missing_videos": ds.missing}
    run.finish(metrics)
    return metrics


def _run_samples(run: Run, samples, predict, bench: str, progress: bool, crash_after: int | None) -> dict:
    """Predict every sample not yet in ``run`` (appending each row atomically); returns {id: row}. ``crash_after``
    (tests only) exits the process after that many new rows, as a kill would."""
    done = run.done()
    new = 0
    for s in samples:
        if s.id in done:
            continue
        row = predict(s)
        run.append(row)
        done[s.id] = row
        new += 1
        if progress and sys.stderr.isatty():
            print(f"\r{bench}: {len(done)}/{len(samples)}", end="", file=sys.stderr, flush=True)
        if crash_after is not None and new >= crash_after:
            os._exit(3)
    return done


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
_PIPELINES: dict = {}


def model_name(model) -> str:
    if isinstance(model, str):
        return os.path.basename(os.path.normpath(model)) or model
    ad = getattr(model, "adapter", model)
    return getattr(getattr(ad.model, "config", None), "model_type", type(ad.model).__name__)


def _adapter(model, device=None):
    """A loaded adapter for ``model`` (path/hub id: loaded once per process; an adapter or Pipeline: used as is)."""
    if not isinstance(model, str):
        return getattr(model, "adapter", model)
    if model not in _PIPELINES:
        from ..models import load_adapter

        _PIPELINES[model] = load_adapter(model, device=device)
    return _PIPELINES[model]


def qa_recipe_name(recipe: Recipe) -> str:
    parts = [recipe.frames or "uniform", recipe.tokens or "all", recipe.attention or "dense", recipe.kv or "fullkv"]
    b = recipe.budget
    if b.tokens:
        parts.append(f"t{b.tokens}")
    if b.density:
        parts.append(f"d{b.density:g}")
    return "+".join(p.replace(":", "-").replace(",", "_") for p in parts)


def evaluate_qa(bench: str, data: str, model, recipe: Recipe, out: str, progress: bool = False,
                limit: int | None = None, crash_after: int | None = None, max_new_tokens: int = 16) -> dict:
    """Multiple-choice question answering with a video LLM; resumable like frame-search runs."""
    from ..pipeline import Pipeline
    from .metrics import accuracy, extract_letter

    ds = load(bench, data)
    qa = [s for s in ds.samples if s.options and s.answer]
    if ds.samples and not qa:
        raise InputError(f"{bench} has no multiple-choice answers in {data}: question answering needs options and an "
                         "answer letter per question (use --model none for temporal search)")
    name = model_name(model)
    path = run_dir(out, bench, name, qa_recipe_name(recipe), recipe.budget.frames)
    run = Run(path, {"bench": bench, "data": os.path.abspath(data), "model": model if isinstance(model, str) else name,
                     "recipe": recipe.to_dict()})
    if run.finished:
        import json

        return json.loads(run.metrics_path.read_text())
    pipe = Pipeline(_adapter(model), recipe, max_new_tokens=max_new_tokens)
    samples = qa[:limit] if limit else qa

    def predict(s):
        ans = pipe.ask(s.video, PROMPT.format(question=s.question, options="\n".join(s.options)))
        st = ans.stats
        pred = extract_letter(ans.text, s.options)
        return {"id": s.id, "video": os.path.basename(s.video), "reply": ans.text, "pred": pred, "answer": s.answer,
                "correct": pred == s.answer, "visual_tokens": st.visual_tokens, "prompt_tokens": st.prompt_tokens,
                "llm_tokens": st.llm_tokens_after_cut, "frames": st.frames, "ttft_ms": round(st.ms_first_token, 2),
                "peak_memory_mb": round(st.peak_memory_mb, 1), "fields": s.fields}

    done = _run_samples(run, samples, predict, bench, progress, crash_after)
    rows = [done[s.id] for s in samples if s.id in done]
    metrics = {"bench": bench, "model": name, "recipe": recipe.to_dict(), "task": "qa",
               "accuracy": accuracy([{**r.get("fields", {}), **r} for r in rows], by=ds.breakdown),
               "visual_tokens_mean": _mean(r["visual_tokens"] for r in rows),
               "ttft_ms_mean": _mean(r["ttft_ms"] for r in rows),
               "ttft_ms_median": _median([r["ttft_ms"] for r in rows]),
               "peak_memory_mb_max": max((r["peak_memory_mb"] for r in rows), default=0.0),
               "unanswered": sum(r["pred"] is None for r in rows),
               "n": len(rows), "missing_videos": ds.missing}
    run.finish(metrics)
    return metrics


def _median(xs: list) -> float:
    xs = sorted(xs)
    return float(xs[len(xs) // 2]) if xs else 0.0
