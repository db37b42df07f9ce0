"""pbs's two data-movement steps against the torch steps they replaced, alone and inside the whole estimate and
``sparse_attention`` call, in the same process: the key permutation (one sort per segment, ``pbs.segment_order``,
against sorting all keys and then stably by segment) and the row gather (``kernels.gather``, against
``torch.gather`` with the index expanded over D, and ``index_select`` over the flattened rows), at 28 heads over 4
and over 28 K/V heads; and the whole call of the patterns whose attention gathers each head's sequences
(``token_sparse``, ``grid``) with the torch gather swapped in and, with ``--ops-against FILE``, through another copy
of ``attention/ops.py`` (an earlier commit's), with each call's peak memory.

    python benchmarks/pbs_steps.py [--sizes 32768,65536,131072] [--kv-heads 4,28] [--ops-against FILE]
        [--gathered-batch B] [--markdown-from FILE [--note TEXT]]

``--gathered-batch B`` runs only token_sparse's and grid's calls, on B copies of the inputs seen as [B, H, N, D]
views of [B, N, H, D] projections (the layout a model passes), saves ``pbs_steps_gathered_bB.json`` and writes the
section "Gathered patterns on batch-B projection views".

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
    gpu_cell, interleaved, load_copy, markdown_args, ms_cell, new_payload, rewrite_markdown, run_rows, swapped,
    update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import ops, sparse_attention  # noqa: E402
from vidsparse.attention.layout import gather_rows, gather_rows_torch  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402
from vidsparse.attention.patterns import pbs as pbs_mod  # noqa: E402

ROUND_MS = 200
H, D = 28, 128
GATHERED = ("token_sparse", "grid")


def two_sorts(score: torch.Tensor, segment: int) -> torch.Tensor:
    """The permutation as pbs computed it before ``segment_order``: all keys by score, then stably by segment."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return torch.gather(order, -1, torch.argsort(order // segment, dim=-1, stable=True))


def rows_index_select(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The row gather as ``index_select`` over x's flattened rows (x contiguous)."""
    b, h, n, d = x.shape
    base = torch.arange(b * h, device=x.device).view(b, h, 1) * n
    return x.reshape(-1, d).index_select(0, (index + base).reshape(-1)).view(b, h, -1, d)


def run_case(n: int, hk: int, monitor, against=None) -> dict:
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
    gathered = run_gathered(q, k, v, n, monitor, against)
    res = {"n": n, "heads": H, "kv_heads": hk, "density": lay.density(), "equal": equal, "sort": sort, "rows": rows,
           "estimate": est, "call": call, "gathered": gathered,
           "share_old": est["old"]["ms"] / call["old"]["ms"], "share_new": est["new"]["ms"] / call["new"]["ms"]}
    print(n, f"{H}/{hk}", equal, {x: round(sort[x]["ms"], 3) for x in sort}, {x: round(rows[x]["ms"], 3) for x in rows},
          "estimate", {x: round(est[x]["ms"], 3) for x in est}, "call", {x: round(call[x]["ms"], 3) for x in call},
          f"share {res['share_old']:.3f} -> {res['share_new']:.3f}",
          {x: {y: round(g[y]["ms"], 3) if "ms" in g[y] else g[y]["error"][:40] for y in ("against", "torch_gather",
                                                                                          "new") if y in g}
           for x, g in gathered.items()}, flush=True)
    return res


def run_gathered(q, k, v, n: int, monitor, against=None) -> dict:
    """token_sparse's and grid's calls on their own layouts: new, with the torch gather swapped in, and through
    ``against`` (another copy of ops.py): ms, GPU ms, peak memory, equality with the new output."""
    timer = lambda fn: bench_ms(fn, rep_ms=ROUND_MS)  # noqa: E731
    gathered = {}  # the patterns whose attention gathers each head's sequences (ops._attend_gathered)
    video_meta = SeqMeta(128, 128, True, visual=(256, n), tokens_per_frame=256, frame_hw=(16, 16))  # video_qk's
    for spec in GATHERED:
        glay = PATTERNS.from_spec(spec).estimate(q, k, video_meta)
        g_new = lambda glay=glay: sparse_attention(q, k, v, glay)  # noqa: E731
        fns = {"torch_gather": swapped(ops, "gather_rows", gather_rows_torch, g_new), "new": g_new}
        if against is not None:
            fns = {"against": lambda glay=glay: against.sparse_attention(q, k, v, glay), **fns}
        entry, want = {"density": glay.density()}, g_new()
        for name, fn in list(fns.items()):
            try:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                got = fn()
                entry[f"{name}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30  # before the diff's
                entry[f"{name}_equal"] = bool(torch.equal(got, want))
                entry[f"{name}_max_diff"] = (got.float() - want.float()).abs().max().item()
                del got
            except torch.cuda.OutOfMemoryError as exc:
                entry[name] = {"error": f"out of memory: {str(exc).splitlines()[0][:160]}"}
                del fns[name]
                torch.cuda.empty_cache()
        for name, t in interleaved(fns, timer, 3, monitor).items():
            entry[name] = {**t, "graph_ms": graph_ms(fns[name])}
        gathered[spec] = entry
    return gathered


def gathered_case(n: int, hk: int, batch: int, monitor, against=None) -> dict:
    """``run_gathered`` alone on ``batch`` copies of the inputs seen as [B, H, N, D] views of [B, N, H, D]
    projections (a model's layout: q.reshape(1, B·H, N, D) copies them for B > 1)."""
    q, k, _, _ = video_qk(n // 256 - 1, 16, 16, H, hk, D)
    v = torch.randn_like(k)
    q, k, v = (x.transpose(1, 2).repeat(batch, 1, 1, 1).transpose(1, 2) for x in (q, k, v))
    gathered = run_gathered(q, k, v, n, monitor, against)
    print(n, f"{H}/{hk}", f"batch {batch}", {x: {y: round(g[y]["ms"], 3) if "ms" in g[y] else g[y]["error"][:40]
                                                 for y in ("against", "torch_gather", "new") if y in g}
                                             for x, g in gathered.items()}, flush=True)
    return {"n": n, "heads": H, "kv_heads": hk, "batch": batch, "gathered": gathered}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32768,65536,131072")
    ap.add_argument("--kv-heads", default="4,28")
    ap.add_argument("--ops-against", default="", help="another copy of attention/ops.py (git show "
                    "REV:src/vidsparse/attention/ops.py > FILE): token_sparse's and grid's calls also run through it")
    ap.add_argument("--gathered-batch", type=int, default=0, help="only token_sparse's and grid's calls, on this "
                    "many copies of the inputs as [B, N, H, D] projection views (saved as pbs_steps_gathered_bB.json)")
    markdown_args(ap, "pbs_steps")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    against = load_copy(args.ops_against, "vidsparse.attention._ops_against") if args.ops_against else None
    gb = args.gathered_batch
    cmd = (f"python benchmarks/pbs_steps.py --sizes {args.sizes} --kv-heads {args.kv_heads}"
           + (f" --ops-against {args.ops_against}" if against else "") + (f" --gathered-batch {gb}" if gb else ""))
    payload = new_payload("pbs_steps", cmd, heads=H, d=D, gathered_batch=gb)
    cases = [(int(n), int(hk)) for hk in args.kv_heads.split(",") for n in args.sizes.split(",")]
    if gb:
        run_rows(f"pbs_steps_gathered_b{gb}", payload, cases,
                 lambda c, monitor: gathered_case(*c, gb, monitor, against), write_markdown)
    else:
        run_rows("pbs_steps", payload, cases, lambda c, monitor: run_case(*c, monitor, against), write_markdown)


def write_markdown(p: dict) -> None:
    if p.get("gathered_batch"):
        lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {p['heads']} heads, d = {p['d']}, "
                 f"batch {p['gathered_batch']}: video-structured q/k (M-RoPE, 16×16 tokens per frame) and random v, "
                 "copied per batch entry and seen as [B, H, N, D] views of [B, N, H, D] projections, as a model "
                 "passes them.", "", *([p["note"], ""] if p.get("note") else []), *gathered_lines(p)]
        update_markdown(f"Gathered patterns on batch-{p['gathered_batch']} projection views ({p['device']})",
                        "\n".join(lines))
        return
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
    if any(r.get("gathered") for r in p["rows"]):
        lines += ["", *gathered_lines(p)]
    update_markdown(f"pbs: permutation and row gather ({p['device']})", "\n".join(lines))


def gathered_lines(p: dict) -> list[str]:
    """The table of token_sparse's and grid's calls (``run_gathered``)."""
    lines = ["The patterns whose attention gathers each head's sequences (`ops._attend_gathered`: q, and K "
             "and V through each query head's K/V head), at their defaults on the same q/k/v: the call with the "
             "torch gather swapped in, and as it is (`new`); with `--ops-against`, also through that copy of "
             "`attention/ops.py` (`against`). Cells: ms (SM MHz), GPU ms from a CUDA-graph replay where the "
             "call can be captured, and the call's peak memory over what was allocated before it. Equal: each output "
             "equals `new`'s bit for bit (else the largest difference).", "",
             "| N | heads/KV | batch | pattern | density | against | torch gather | new | new / against | "
             "new / torch gather | equal |", "|" + "---|" * 11]

    def cell(g, name):
        x = g.get(name)
        if x is None:
            return "-"
        if "error" in x:
            return x["error"].split(":")[0]
        return f"{ms_cell(x)}, GPU {gpu_cell(x)}, {g[name + '_peak_gb']:.1f} GB"

    for r in p["rows"]:
        for spec, g in r.get("gathered", {}).items():
            ratio = lambda a: f"{g['new']['ms'] / g[a]['ms']:.3f}" if "ms" in g.get(a, {}) else "-"  # noqa: E731
            eq = all(g[x] for x in g if x.endswith("_equal"))
            diffs = [g[x] for x in g if x.endswith("_max_diff")]  # (not in runs before it was recorded)
            same = "yes" if eq else f"no (max diff {max(diffs):.3g})" if diffs else "no"
            lines.append(f"| {r['n']} | {r['heads']}/{r['kv_heads']} | {r.get('batch', 1)} | `{spec}` | "
                         f"{g['density']:.3f} | {cell(g, 'against')} | {cell(g, 'torch_gather')} | {cell(g, 'new')} | "
                         f"{ratio('against')} | {ratio('torch_gather')} | {same} |")
    return lines


if __name__ == "__main__":
    main()
