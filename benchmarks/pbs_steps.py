"""pbs's two data-movement steps against the torch steps they replaced, alone and inside the whole estimate and
``sparse_attention`` call, in the same process: the key permutation (one sort per segment, ``pbs.segment_order``,
against sorting all keys and then stably by segment) and the row gather (``kernels.gather``, against
``torch.gather`` with the index expanded over D, and ``index_select`` over the flattened rows), at 28 heads over 4
and over 28 K/V heads.

    python benchmarks/pbs_steps.py [--sizes 32768,65536,131072] [--kv-heads 4,28] [--markdown-from FILE [--note TEXT]]

q/k are video-structured (``attention.video_qk``), v random; ``pbs`` at its defaults. The steps run on the
estimate's own scores and permutation. The old steps are swapped in for the new (``common.swapped``); the callables
of a row run in alternating rounds; GPU ms is the call captured in a CUDA graph and replayed. Saves
``pbs_steps.json`` under the device's results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, graph_ms, video_qk  # noqa: E402
from common import (  # noqa: E402
    gpu_cell, interleaved, markdown_args, ms_cell, new_payload, rewrite_markdown, run_rows, swapped, update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import ops, sparse_attention  # noqa: E402
from vidsparse.attention.layout import gather_rows, gather_rows_torch  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402
from vidsparse.attention.patterns import pbs as pbs_mod  # noqa: E402

ROUND_MS = 200
H, D = 28, 128


def two_sorts(score: torch.Tensor, segment: int) -> torch.Tensor:
    """The permutation as pbs computed it before ``segment_order``: all keys by score, then stably by segment."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return torch.gather(order, -1, torch.argsort(order // segment, dim=-1, stable=True))


def rows_index_select(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The row gather as ``index_select`` over x's flattened rows (x contiguous)."""
    b, h, n, d = x.shape
    base = torch.arange(b * h, device=x.device).view(b, h, 1) * n
    return x.reshape(-1, d).index_select(0, (index + base).reshape(-1)).view(b, h, -1, d)


def run_case(n: int, hk: int, monitor) -> dict:
    q, k, _, _ = video_qk(n // 256 - 1, 16, 16, H, hk, D)
    v = torch.randn_like(k)
    p = PATTERNS.from_spec("pbs")
    meta = SeqMeta(128, 128, True)
    score = p.key_scores(q, k)
    perm = pbs_mod.segment_order(score, p.segment)
    equal = {"permutation": bool(torch.equal(perm, two_sorts(score, p.segment)))}
    ref = gather_rows_torch(k, perm)
    equal["rows_kernel"] = bool(torch.equal(gather_rows(k, perm), ref))
    equal["rows_index_select"] = bool(torch.equal(rows_index_select(k, perm), ref))
    timer = lambda fn: bench_ms(fn, rep_ms=ROUND_MS)  # noqa: E731
    sort = interleaved({"two_sorts": lambda: two_sorts(score, p.segment),
                        "segment_order": lambda: pbs_mod.segment_order(score, p.segment)}, timer, 3, monitor)
    rows = interleaved({"torch_gather": lambda: gather_rows_torch(k, perm),
                        "index_select": lambda: rows_index_select(k, perm),
                        "kernel": lambda: gather_rows(k, perm)}, timer, 3, monitor)
    new_est = lambda: p.estimate(q, k, meta)  # noqa: E731
    old_est = swapped(pbs_mod, "segment_order", two_sorts, swapped(pbs_mod, "gather_rows", gather_rows_torch, new_est))
    a, b = new_est(), old_est()
    equal["layout"] = bool(torch.equal(a.perm, b.perm) and torch.equal(a.blocks.kv_count, b.blocks.kv_count)
                           and torch.equal(a.blocks.kv_index, b.blocks.kv_index))
    est = interleaved({"old": old_est, "new": new_est}, timer, 3, monitor)
    lay = a
    new_call = lambda: sparse_attention(q, k, v, lay)  # noqa: E731
    old_call = swapped(ops, "gather_rows", gather_rows_torch, new_call)
    equal["output"] = bool(torch.equal(new_call(), old_call()))
    call = interleaved({"old": old_call, "new": new_call}, timer, 3, monitor)
    for t, fns in ((est, {"old": old_est, "new": new_est}), (call, {"old": old_call, "new": new_call})):
        for name, fn in fns.items():
            t[name]["graph_ms"] = graph_ms(fn)
    res = {"n": n, "heads": H, "kv_heads": hk, "density": lay.density(), "equal": equal, "sort": sort, "rows": rows,
           "estimate": est, "call": call,
           "share_old": est["old"]["ms"] / call["old"]["ms"], "share_new": est["new"]["ms"] / call["new"]["ms"]}
    print(n, f"{H}/{hk}", equal, {x: round(sort[x]["ms"], 3) for x in sort}, {x: round(rows[x]["ms"], 3) for x in rows},
          "estimate", {x: round(est[x]["ms"], 3) for x in est}, "call", {x: round(call[x]["ms"], 3) for x in call},
          f"share {res['share_old']:.3f} -> {res['share_new']:.3f}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32768,65536,131072")
    ap.add_argument("--kv-heads", default="4,28")
    markdown_args(ap, "pbs_steps")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    payload = new_payload("pbs_steps", f"python benchmarks/pbs_steps.py --sizes {args.sizes} "
                          f"--kv-heads {args.kv_heads}", heads=H, d=D)
    cases = [(int(n), int(hk)) for hk in args.kv_heads.split(",") for n in args.sizes.split(",")]
    run_rows("pbs_steps", payload, cases, lambda c, monitor: run_case(*c, monitor), write_markdown)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {p['heads']} heads, d = {p['d']}, "
             "batch 1, video-structured q/k (M-RoPE, 16×16 tokens per frame), random v, `pbs` at its defaults.", "",
             "The key permutation: one sort per 1024-key segment (`pbs.segment_order`) against sorting all keys and "
             "then stably by segment (the two sorts it replaced). The row gather of the permuted keys: the Triton "
             "kernel `attention.kernels.gather` against `torch.gather` with the index expanded over D and against "
             "`index_select` over the flattened rows. Then the whole `pbs` estimate with both old steps swapped in, "
             "and the whole `sparse_attention` call on its layout (which gathers K and V) with the torch gather "
             "swapped in. Callables of a row run in 3 alternating rounds in one process; cells read ms (SM MHz); "
             "GPU ms: the call captured in a CUDA graph and replayed. Share: estimate ms over call ms. Equal: the "
             "new steps' permutation, rows, layout and attention output equal the old ones' bit for bit.",
             "", *([p["note"], ""] if p.get("note") else []),
             "| N | heads/KV | sort: two sorts | sort: per segment | gather: torch.gather | gather: index_select | "
             "gather: kernel | estimate old / new ms | estimate GPU ms old / new | call old / new ms | "
             "call GPU ms old / new | share old → new | equal |", "|" + "---|" * 13]
    for r in p["rows"]:
        s, g, e, c = r["sort"], r["rows"], r["estimate"], r["call"]
        lines.append(f"| {r['n']} | {r['heads']}/{r['kv_heads']} | {ms_cell(s['two_sorts'])} | "
                     f"{ms_cell(s['segment_order'])} | {ms_cell(g['torch_gather'])} | {ms_cell(g['index_select'])} | "
                     f"{ms_cell(g['kernel'])} | {e['old']['ms']:.3f} / {e['new']['ms']:.3f} | "
                     f"{gpu_cell(e['old'])} / {gpu_cell(e['new'])} | {c['old']['ms']:.3f} / {c['new']['ms']:.3f} | "
                     f"{gpu_cell(c['old'])} / {gpu_cell(c['new'])} | {100 * r['share_old']:.1f}% → "
                     f"{100 * r['share_new']:.1f}% | {'yes' if all(r['equal'].values()) else r['equal']} |")
    update_markdown(f"pbs: permutation and row gather ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
