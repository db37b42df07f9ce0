"""The ``vidsparse`` command line: ``demo``, ``select``, ``ask``, ``eval``, ``haystack``, ``report``.

Every user error is a ``VidsparseError``: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .errors import InputError, ResourceError, VidsparseError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long-video understanding under one token budget.")


def _fail(exc: VidsparseError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def _guard(fn):
    """Run a command body, turning user errors and out-of-memory into one line and exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what a user should know is in the result's notes, printed below
                return fn(*args, **kwargs)
        except VidsparseError as exc:
            _fail(exc)
        except MemoryError:
            _fail(ResourceError("out of memory; use a smaller --budget or a lower index --fps"))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _table(moments, title: str, truth=None):
    from rich.console import Console
    from rich.table import Table

    from .moments import _clock

    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("time")
    table.add_column("score", justify="right")
    table.add_column("tokens", justify="right")
    if truth is not None:
        table.add_column("ground truth")
    for i, f in enumerate(moments.to_dict()["frames"]):
        row = [str(i + 1), _clock(f["t"]), "-" if f["score"] is None else f"{f['score']:.3f}", str(f["tokens"])]
        if truth is not None:
            row.append(truth(f["t"]))
        table.add_row(*row)
    Console(stderr=False).print(table)


@app.command()
@_guard
def select(
    video: str = typer.Argument(..., help="Video file."),
    budget: int = typer.Option(32, "--budget", "-n", help="Frames to select."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Visual-token budget (default: frames x 256)."),
    frames: Optional[str] = typer.Option(None, "--frames", help="Selector spec, e.g. bolt:power=3 (default: ktv, or bolt/tstar with a query)."),
    query: Optional[str] = typer.Option(None, "--query", "-q", help="Text to look for (on screen, in subtitles, or via CLIP)."),
    query_image: Optional[str] = typer.Option(None, "--query-image", help="Image of what to look for."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Scorer spec: visual, ocr, subtitles, clip:path=DIR."),
    subtitles: Optional[str] = typer.Option(None, "--subtitles", help=".srt file scored against the query."),
    fps: float = typer.Option(1.0, "--fps", help="Candidate rate of the index (frames per second)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory for selection.json and contact_sheet.png."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the thumbnail cache."),
):
    """Select the moments of VIDEO that match a query (or summarise it without one) under a frame budget."""
    from .moments import contact_sheet, find_moments, write_json
    from .recipe import Budget

    b = Budget(frames=budget, tokens=tokens)
    moments, index = find_moments(video, b, frames, query, query_image, scorer, subtitles, fps=fps,
                                  cache=not no_cache, progress=not as_json)
    if out:
        os.makedirs(out, exist_ok=True) if not os.path.isfile(out) else _fail(InputError(f"--out {out} is a file; give a directory"))
        moments.stats["frames_decoded"] += contact_sheet(index, moments.selection, str(Path(out) / "contact_sheet.png"))
        write_json(str(Path(out) / "selection.json"), moments.to_dict())
    if as_json:
        typer.echo(json.dumps(moments.to_dict()))
        return
    _table(moments, f"{os.path.basename(video)}: {len(moments.selection)} frames by {moments.frames_spec}"
           + (f" scored by {moments.scorer_spec}" if moments.scorer_spec else ""))
    for note in moments.selection.notes:
        typer.echo(f"note: {note}")
    st = moments.stats
    typer.echo(f"{st['candidates']} candidates, {st['frames_scored']} scored, {st['frames_decoded']} frames decoded, "
               f"{st['seconds']:.2f} s" + (f"; wrote {out}/selection.json and contact_sheet.png" if out else ""))


@app.command()
@_guard
def demo(
    out: str = typer.Option("vidsparse-demo", "--out", "-o", help="Directory for the demo's outputs."),
    budget: int = typer.Option(8, "--budget", "-n", help="Frames to select."),
    query: str = typer.Option("", "--query", "-q", help="Text to find (default: the caption planted in the video)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
):
    """Build a 10-minute synthetic video (once), find an on-screen caption in it with OCR-scored T* search, and
    compare what was found with the known ground truth."""
    from .moments import contact_sheet, find_moments, write_json
    from .recipe import Budget
    from .video.index import cache_dir
    from .video.synthetic import GroundTruth, make_synthetic_video

    vdir = cache_dir() / "demo"
    vdir.mkdir(parents=True, exist_ok=True)
    video = vdir / "demo_v2.mp4"
    if not (video.is_file() and Path(str(video) + ".json").is_file()):
        if not as_json:
            typer.echo(f"building the demo video (once): {video}")
        make_synthetic_video(str(video), duration_s=600.0, fps=10.0, seed=0)
    gt = GroundTruth.load(str(video) + ".json")
    text = query or gt.needle_text
    moments, index = find_moments(str(video), Budget(frames=budget), query=text, progress=not as_json)
    sel = moments.selection
    events = gt.needle_events if text == gt.needle_text else [e for e in gt.text_events if e.label == text]
    hit = [any(e.contains(t) for t in sel.times) for e in events]
    os.makedirs(out, exist_ok=True)
    moments.stats["frames_decoded"] += contact_sheet(index, sel, str(Path(out) / "contact_sheet.png"))
    report = moments.to_dict()
    report["ground_truth"] = {"query": text, "events": [{"start": e.start, "end": e.end, "found": h} for e, h in zip(events, hit)],
                              "found": int(sum(hit)), "total": len(events)}
    write_json(str(Path(out) / "selection.json"), report)
    if as_json:
        typer.echo(json.dumps(report))
        return

    def truth(t):
        for e in gt.text_events:
            if e.contains(t):
                return f"text {e.label!r} on screen {e.start:.0f}-{e.end:.0f}s"
        return ""

    _table(moments, f"demo: {budget} frames for {text!r} by {moments.frames_spec} + {moments.scorer_spec}", truth)
    st = moments.stats
    typer.echo(f"found {sum(hit)} of {len(events)} times {text!r} is on screen; scored {st['frames_scored']} of "
               f"{st['candidates']} candidates ({100 * st['frames_scored'] / st['candidates']:.1f}%), "
               f"{st['seconds']:.1f} s")
    for e, h in zip(events, hit):
        typer.echo(f"  {'found ' if h else 'MISSED'} {e.start:6.1f}-{e.end:6.1f}s")
    typer.echo(f"wrote {out}/selection.json and {out}/contact_sheet.png")


def recipe_from_flags(recipe: Optional[str], frames, tokens, attention, kv, scorer, budget, budget_tokens, density,
                      kv_bits):
    """A recipe file (if given) with any stage/budget flag overriding it."""
    from dataclasses import replace

    from .recipe import Budget, Recipe

    base = Recipe.load(recipe) if recipe else Recipe()
    stages = {k: v for k, v in dict(frames=frames, tokens=tokens, attention=attention, kv=kv, scorer=scorer).items()
              if v is not None}
    b = base.budget
    nb = Budget(frames=budget if budget is not None else b.frames,
                tokens=budget_tokens if budget_tokens is not None else b.tokens,
                density=density if density is not None else b.density,
                kv_bits=kv_bits if kv_bits is not None else b.kv_bits)
    return replace(base, **stages, budget=nb)


@app.command()
@_guard
def ask(
    video: str = typer.Argument(..., help="Video file."),
    question: str = typer.Argument(..., help="The question about the video."),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint directory (or a hub id already downloaded)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe file (.yaml/.json); flags below override it."),
    frames: Optional[str] = typer.Option(None, "--frames", help="Frame selector spec (default: uniform at 2 fps)."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Scorer spec for query-aware selectors."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Token reducer spec, e.g. aot or fastv:k=2,r=0.5."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Sparse prefill pattern, e.g. block_topk."),
    kv: Optional[str] = typer.Option(None, "--kv", help="KV cache spec, e.g. snapkv:capacity=4096."),
    budget: Optional[int] = typer.Option(None, "--budget", "-n", help="Frames the vision tower sees (default 32)."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Visual tokens the LLM sees."),
    density: Optional[float] = typer.Option(None, "--budget-density", help="Fraction of causal attention blocks computed."),
    kv_bits: Optional[float] = typer.Option(None, "--budget-kv-bits", help="Bits per cached KV element."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer, in tokens."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16 or float32."),
    compile_tower: bool = typer.Option(False, "--compile-tower",
                                       help="torch.compile the vision tower's blocks (faster after a one-time compile)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
):
    """Answer a question about a video with a video LLM under the recipe's budget."""
    from .pipeline import Pipeline

    r = recipe_from_flags(recipe, frames, tokens, attention, kv, scorer, budget, budget_tokens, density, kv_bits)
    if not os.path.isfile(video):
        raise InputError(f"video {video} does not exist")
    pipe = Pipeline.from_pretrained(model, r, device=device, dtype=dtype, max_new_tokens=max_new_tokens,
                                    compile_tower=compile_tower)
    ans = pipe.ask(video, question, progress=not as_json)
    if as_json:
        d = ans.to_dict()
        d["recipe"] = r.to_dict()
        typer.echo(json.dumps(d))
        return
    st = ans.stats
    typer.echo(ans.text)
    typer.echo(f"[{st.frames} frames at {st.frame_size[1]}x{st.frame_size[0]} -> {st.tower_tokens} tower tokens -> "
               f"{st.visual_tokens} visual -> {st.prompt_tokens} prompt tokens; first token {st.ms_first_token:.0f} ms "
               f"(decode {st.ms_decode:.0f}, vision {st.ms_vision:.0f}, reduce {st.ms_reduction:.0f}, prefill "
               f"{st.ms_prefill:.0f}); peak {st.peak_memory_mb:.0f} MB]", err=True)


@app.command()
@_guard
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint directory (omit: moment search only)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Default recipe file; requests may override it."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="Port."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16 or float32."),
    upload_dir: Optional[str] = typer.Option(None, "--upload-dir", help="Where POST /upload stores videos."),
):
    """Serve /ask, /moments and a page over HTTP (the model is loaded once)."""
    try:
        import uvicorn

        from .serve.app import create_app
    except ImportError:
        from .errors import UnsupportedError

        raise UnsupportedError("the server needs FastAPI and uvicorn: pip install 'vidsparse[serve]'") from None
    from .recipe import Recipe

    r = Recipe.load(recipe) if recipe else Recipe()
    adapter = None
    if model:
        from .models import load_adapter

        adapter = load_adapter(model, device=device, dtype=dtype)
    uvicorn.run(create_app(adapter, r, upload_dir), host=host, port=port)


@app.command("eval")
@_guard
def eval_cmd(
    bench: str = typer.Option(..., "--bench", help="videomme, videomme_sub, mlvu, longvideobench, egoschema, lvhaystack."),
    data: str = typer.Option(..., "--data", help="The dataset folder (annotations + videos) or an annotation file."),
    model: str = typer.Option("none", "--model", help="Model path or hub id; 'none' evaluates frame search alone."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe file (.yaml/.json)."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="YAML of lists to sweep: frames, scorer, tokens, "
                                        "attention, kv, budget, visual_tokens, density."),
    out: str = typer.Option("runs", "--out", help="Directory of run directories."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N samples."),
    compile_tower: bool = typer.Option(False, "--compile-tower",
                                       help="torch.compile the vision tower's blocks (pays off over many questions)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON only."),
):
    """Evaluate recipes on a benchmark; one resumable run directory per configuration."""
    from .eval.harness import _adapter, evaluate
    from .recipe import Recipe

    if compile_tower and model != "none":
        ad = _adapter(model)
        if not ad.supports_compile:
            from .errors import UnsupportedError

            raise UnsupportedError(f"{type(ad).__name__} has no compiled tower path")
        ad.compile_tower = True
    base = Recipe.load(recipe) if recipe else Recipe()
    results = [evaluate(bench, data, model, r, out, progress=not as_json, limit=limit) for r in _sweep(base, sweep)]
    if as_json:
        typer.echo(json.dumps(results))
        return
    for m in results:
        if m.get("task") == "qa":
            a = m["accuracy"]
            typer.echo(f"{m['bench']} {m['model']} {Recipe.from_dict(m['recipe']).to_cli()}: accuracy "
                       f"{a['accuracy']:.3f} over {m['n']} questions ({m['unanswered']} unanswered); "
                       f"{m['visual_tokens_mean']:.0f} visual tokens, TTFT {m['ttft_ms_median']:.0f} ms median"
                       + (f"; {len(m['missing_videos'])} videos missing" if m["missing_videos"] else ""))
            continue
        t = m["temporal"]
        typer.echo(f"{m['bench']} {m['recipe']['frames'] or 'default'} budget {m['recipe']['budget']['frames']}: "
                   f"F1 {t['f1']:.3f} (P {t['precision']:.3f}, R {t['recall']:.3f}) over {m['n']} samples, "
                   f"{m['frames_scored_mean']:.1f} frames scored per query"
                   + (f"; {len(m['missing_videos'])} videos missing" if m["missing_videos"] else ""))


def _sweep(base, path):
    """The recipes of a sweep file: the product of its lists over the base recipe. Keys: frames, scorer, tokens,
    attention, kv (method specs), budget (frames), visual_tokens (budget.tokens), density (budget.density)."""
    import itertools
    from dataclasses import replace

    from .errors import SpecError

    if not path:
        return [base]
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such sweep file") from None
    keys = {"frames", "scorer", "tokens", "attention", "kv", "budget", "visual_tokens", "density"}
    if not isinstance(spec, dict) or set(spec) - keys:
        raise SpecError(f"a sweep file maps some of {', '.join(sorted(keys))} to lists")
    lists = {k: (spec.get(k) if isinstance(spec.get(k), list) else [spec.get(k)]) or [None] for k in keys}
    out = []
    for combo in itertools.product(*(lists[k] for k in sorted(keys))):
        c = dict(zip(sorted(keys), combo))
        r = replace(base, **{k: c[k] if c[k] is not None else getattr(base, k)
                             for k in ("frames", "scorer", "tokens", "attention", "kv")})
        b = r.budget
        out.append(replace(r, budget=replace(b, frames=int(c["budget"]) if c["budget"] is not None else b.frames,
                                             tokens=int(c["visual_tokens"]) if c["visual_tokens"] is not None
                                             else b.tokens,
                                             density=float(c["density"]) if c["density"] is not None else b.density)))
    return out


@app.command()
@_guard
def haystack(
    videos: list[str] = typer.Argument(..., help="Source videos for the haystack (looped as needed)."),
    out: str = typer.Option(..., "--out", help="Output folder: videos/ and haystack.jsonl (LV-Haystack format)."),
    lengths: str = typer.Option("300,600,1200", "--lengths", help="Haystack lengths in frames, comma separated."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Needle depths in [0, 1], comma separated."),
    needle_text: Optional[str] = typer.Option(None, "--needle-text", help="Text shown on screen as the needle."),
    needle_image: Optional[str] = typer.Option(None, "--needle-image", help="Image inserted as the needle."),
    needle_clip: Optional[str] = typer.Option(None, "--needle-clip", help="Short clip inserted as the needle."),
    needle_frames: int = typer.Option(3, "--needle-frames", help="Frames the needle lasts."),
    fps: float = typer.Option(1.0, "--fps", help="Haystack frame rate."),
):
    """Build V-NIAH needle-in-a-haystack videos with LV-Haystack annotations."""
    from .eval.needle import Needle, build_haystacks

    def nums(text, cast):
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"expected comma-separated numbers, got {text!r}") from None

    rows = build_haystacks(videos, out, nums(lengths, int), nums(depths, float),
                           Needle(text=needle_text, image=needle_image, clip=needle_clip, frames=needle_frames), fps=fps)
    typer.echo(f"wrote {len(rows)} haystacks and {out}/haystack.jsonl")


@app.command()
@_guard
def report(
    runs: str = typer.Argument("runs", help="Directory of run directories."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write report.md and the plots (default: RUNS)."),
):
    """Summarise finished runs: a markdown table and PNG plots, one line per recipe."""
    from .eval.report import write_report

    md = write_report(runs, out or runs)
    typer.echo(md)


def main() -> None:
    # Typer/click usage errors already exit 2; everything else a user can cause is a VidsparseError.
    app()


if __name__ == "__main__":
    main()
