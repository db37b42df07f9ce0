"""``vidsparse report``: markdown tables and PNG plots over finished runs: temporal F1 vs frames scored for frame
search; accuracy vs visual tokens and TTFT vs visual tokens for question answering, one line per recipe."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..moments import write_atomic


def collect(runs: str) -> list[dict]:
    root = Path(runs)
    if not root.is_dir():
        raise InputError(f"{runs}: no such runs directory")
    rows = []
    for m in sorted(root.glob("*/metrics.json")):
        d = json.loads(m.read_text())
        d["run"] = m.parent.name
        rows.append(d)
    if not rows:
        raise InputError(f"{runs} holds no finished runs (no */metrics.json)")
    return rows


def write_report(runs: str, out: str) -> str:
    allrows = collect(runs)
    qa = [r for r in allrows if r.get("task") == "qa"]
    rows = [r for r in allrows if r.get("task") != "qa"]
    lines = []
    if qa:
        lines += ["| run | bench | model | recipe | frames | visual tokens | accuracy | n | TTFT median ms | "
                  "peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in qa:
            lines.append(f"| {r['run']} | {r['bench']} | {r['model']} | {_recipe_label(r['recipe'])} | "
                         f"{r['recipe']['budget']['frames']} | {r['visual_tokens_mean']:.0f} | "
                         f"{r['accuracy']['accuracy']:.3f} | {r['n']} | {r['ttft_ms_median']:.0f} | "
                         f"{r['peak_memory_mb_max']:.0f} |")
        lines.append("")
    if rows:
        lines += ["| run | bench | frames | scorer | budget | temporal F1 | P | R | frames scored / query |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("temporal", {})
        rec = r["recipe"]
        lines.append(f"| {r['run']} | {r['bench']} | {rec['frames'] or 'default'} | {rec['scorer'] or 'auto'} | "
                     f"{rec['budget']['frames']} | {t.get('f1', 0):.3f} | {t.get('precision', 0):.3f} | "
                     f"{t.get('recall', 0):.3f} | {r.get('frames_scored_mean', 0):.1f} |")
    md = "\n".join(lines) + "\n"
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_atomic(str(outdir / "report.md"), lambda p: Path(p).write_text(md))
    if rows:
        _plot(rows, outdir / "f1_vs_frames_scored.png")
    if qa:
        _plot_qa(qa, "accuracy", outdir / "accuracy_vs_visual_tokens.png")
        _plot_qa(qa, "ttft", outdir / "ttft_vs_visual_tokens.png")
        md += "\n![accuracy](accuracy_vs_visual_tokens.png)\n![ttft](ttft_vs_visual_tokens.png)\n"
    from .needle import needle_heatmap

    for r in rows:  # V-NIAH runs get their depth x length map
        pred = Path(runs) / r["run"] / "predictions.jsonl"
        if pred.is_file() and '"needle_depth"' in pred.read_text():
            needle_heatmap(str(pred.parent), str(outdir / f"{r['run']}_heatmap.png"))
            md += f"\n![{r['run']}]({r['run']}_heatmap.png)\n"
    return md


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for r in rows:
        rec = r["recipe"]
        lines[f"{r['bench']} {rec['frames'] or 'default'} / {rec['scorer'] or 'auto'}"].append(
            (r.get("frames_scored_mean", 0), r.get("temporal", {}).get("f1", 0)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("frames scored per query")
    ax.set_ylabel("temporal F1 (5 s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(str(path), lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def _recipe_label(rec: dict) -> str:
    parts = [rec.get(k) for k in ("frames", "tokens", "attention", "kv") if rec.get(k)]
    return " + ".join(parts) or "vanilla"


def _plot_qa(rows, what: str, path: Path) -> None:
    """One line per recipe (methods, without the budget) across its budgets: accuracy or median TTFT vs visual
    tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for r in rows:
        y = r["accuracy"]["accuracy"] if what == "accuracy" else r["ttft_ms_median"]
        lines[f"{r['bench']} {r['model']}: {_recipe_label(r['recipe'])}"].append((r["visual_tokens_mean"], y))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("visual tokens per question (mean)")
    ax.set_ylabel("accuracy" if what == "accuracy" else "time to first token, ms (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(str(path), lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
