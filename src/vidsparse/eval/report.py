"""``vidsparse report``: a markdown table and PNG plots over finished runs (temporal F1 vs frames scored for frame
search; accuracy and TTFT vs visual tokens once question-answering runs exist)."""

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
    rows = collect(runs)
    lines = ["| run | bench | frames | scorer | budget | temporal F1 | P | R | frames scored / query |",
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
    _plot(rows, outdir / "f1_vs_frames_scored.png")
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
