"""Host time against GPU time of a layer's sparse attention at short sequences: ``sparse_attention`` on the Gluon
path and four patterns' estimates, and the execution of ``token_sparse``'s and ``grid``'s layouts (which sync with
the host once, so cannot be graph-replayed), each timed as launched (the host's µs per call, back to back from an
idle GPU) and as a CUDA-graph replay (the GPU's µs alone); and A/Bs of host-side changes against the steps they
replaced, in alternating rounds in one process (``ABS``: ``fit.capability``, the device's compute capability asked
once per device; vertical_slash's shape-only block geometry cached per shape; a token layout's gathered dense layout
cached per shape; with ``--against-hopper FILE``, this tree's Gluon launch wrapper against another copy of
``block_sparse_hopper.py``, e.g. an earlier commit's).

    python benchmarks/host_overhead.py [--sizes 16384,32768] [--density 0.05] [--against-hopper FILE] [--profile]
        [--markdown-from FILE [--note TEXT]]

``--profile`` also runs each call under cProfile and keeps its costliest Python functions and builtins (µs of own
time per call; the profiler's own overhead inflates them all alike) in the JSON and the printout.

Where the host's µs exceed the GPU's, a call launched on its own waits for the host: ``do_bench`` then times the
launch path (the 16K rows of "Sparse attention"). In a model's prefill the launches queue behind the projections'
and the MLP's GPU work, which at these lengths takes milliseconds per layer, so there the host time stays hidden as
long as it is shorter. q/k are video-structured (``attention.video_qk``), v random, 28 heads over 4 K/V heads,
d = 128, bf16; ``sparse_attention`` runs a random causal layout of ``--density``. Saves ``host_overhead.json`` under
the device's results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import graph_ms, random_layout, video_qk  # noqa: E402
from common import (  # noqa: E402
    host_us, interleaved, load_copy, markdown_args, new_payload, rewrite_markdown, run_rows, swapped, update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import sparse_attention  # noqa: E402
from vidsparse.attention import ops  # noqa: E402
from vidsparse.attention.kernels import block_sparse_hopper, fit  # noqa: E402
from vidsparse.attention.patterns import SeqMeta, vertical_slash  # noqa: E402

H, HK, D = 28, 4, 128
SPECS = ("block_topk:density=0.05", "vertical_slash", "xattention:stride=16,tau=0.9", "pyramid")
TOKEN_SPECS = ("token_sparse", "grid")  # layouts whose execution syncs with the host once (no graph replay)
CALLS, BATCHES, ROUNDS = 50, 7, 5


def uncached_capability(device) -> tuple[int, int]:
    """What the launch paths did before ``fit.capability``: ask torch at every call."""
    return tuple(torch.cuda.get_device_capability(device))


# host-side changes measured in alternating rounds: (call, change, module, name, what replaces it to undo the change)
ABS = (
    ("sparse_attention", "fit.capability cached", fit, "capability", lambda: uncached_capability),
    (f"estimate {SPECS[0]}", "fit.capability cached", fit, "capability", lambda: uncached_capability),
    ("estimate vertical_slash", "block geometry cached per shape", vertical_slash, "_block_geometry",
     lambda: vertical_slash._block_geometry.__wrapped__.__wrapped__),
    ("sparse_attention token_sparse", "gathered sequences' dense layout cached per shape", ops, "_dense",
     lambda: ops._dense.__wrapped__.__wrapped__),
)
ABS_TEXT = ("`fit.capability`: the device's compute capability asked once per device, against asking torch at every "
            "call; vertical_slash's block geometry cached per shape, against computing it at every call; a token "
            "layout's gathered sequences' dense layout cached per shape, against building it after the host sync")


def against_hopper(path: str) -> tuple:
    """The A/B of this tree's Gluon launch wrapper against ``path``'s (another copy of ``block_sparse_hopper.py``)."""
    other = load_copy(path, "vidsparse.attention.kernels._against")
    return ("sparse_attention", f"Gluon launch wrapper, against `{path}`", block_sparse_hopper,
            "block_sparse_attention_hopper", lambda: other.block_sparse_attention_hopper)


def host_profile(fn, calls: int = 100, top: int = 12) -> list[dict]:
    """``fn`` under cProfile: its ``top`` functions by own time, µs and calls per call of ``fn``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own time, cumulative, callers)
    rows = [{"function": f"{Path(f).name}:{line}({name})" if line else name, "own_us": tt / calls * 1e6,
             "calls": nc / calls} for (f, line, name), (_cc, nc, tt, _ct, _callers) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def run_case(n: int, density: float, monitor, abs_=ABS, profile: bool = False) -> dict:
    q, k, text, tpf = video_qk(n // 256 - 1, 16, 16, H, HK, D)
    v = torch.randn_like(k)
    lay = random_layout(H, n, density)
    meta = SeqMeta(128, 128, True)
    calls = {"sparse_attention": lambda: sparse_attention(q, k, v, lay)}
    for spec in SPECS:
        pat = PATTERNS.from_spec(spec)
        calls[f"estimate {spec}"] = lambda pat=pat: pat.estimate(q, k, meta)
    video = SeqMeta(128, 128, True, visual=(text, n), tokens_per_frame=tpf, frame_hw=(16, 16))
    for spec in TOKEN_SPECS:  # the host's time after the sync is the GPU's idle time
        tok = PATTERNS.from_spec(spec).estimate(q, k, video)
        calls[f"sparse_attention {spec}"] = lambda tok=tok: sparse_attention(q, k, v, tok)
    rows = []
    for name, fn in calls.items():
        fn()  # compiled and cached before timing
        host = host_us(fn, CALLS, BATCHES)
        gpu = graph_ms(fn)
        rows.append({"call": name, "host_us": host, "gpu_us": None if gpu is None else gpu * 1e3})
        if profile:
            rows[-1]["profile"] = host_profile(fn)
    ab = []
    for name, change, module, attr, without in abs_:
        pair = {"with": calls[name], "without": swapped(module, attr, without(), calls[name])}
        timed = interleaved(pair, lambda fn: host_us(fn, CALLS, 3), ROUNDS)  # µs, though interleaved says "ms"
        ab.append({"call": name, "change": change, "with_us": timed["with"]["ms"],
                   "without_us": timed["without"]["ms"], "rounds": {x: t["rounds"] for x, t in timed.items()}})
    res = {"n": n, "heads": H, "kv_heads": HK, "density": lay.density(), "rows": rows, "ab": ab}
    for r in rows:
        gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.0f}"
        print(f"N={n} {r['call']}: host {r['host_us']:.0f} us per call, GPU {gpu} us", flush=True)
        for x in r.get("profile", []):
            print(f"    {x['own_us']:8.1f} us  x{x['calls']:<5g} {x['function']}", flush=True)
    for r in ab:
        print(f"N={n} {r['call']}, {r['change']}: with {r['with_us']:.0f} us, without {r['without_us']:.0f} us",
              flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--against-hopper", default="", help="another copy of block_sparse_hopper.py: its launch wrapper "
                    "against this tree's, in alternating rounds")
    ap.add_argument("--profile", action="store_true", help="each call's costliest functions under cProfile")
    markdown_args(ap, "host_overhead")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    abs_, text = ABS, ABS_TEXT
    if args.against_hopper:
        abs_ = (*ABS, against_hopper(args.against_hopper))
        text += f"; the Gluon launch wrapper of this tree against that of `{args.against_hopper}`"
    command = f"python benchmarks/host_overhead.py --sizes {args.sizes} --density {args.density}" + \
        (f" --against-hopper {args.against_hopper}" if args.against_hopper else "") + \
        (" --profile" if args.profile else "")
    payload = new_payload("host_overhead", command, heads=H, kv_heads=HK, d=D, calls=CALLS, batches=BATCHES,
                          rounds=ROUNDS, ab_text=text)
    cases = [int(n) for n in args.sizes.split(",")]
    run_rows("host_overhead", payload, cases,
             lambda n, monitor: run_case(n, args.density, monitor, abs_, args.profile), write_markdown)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {p['heads']} heads / {p['kv_heads']} "
             f"K/V heads, d = {p['d']}, batch 1, video-structured q/k, random v.", "",
             f"Host µs: {p['calls']} calls back to back from an idle GPU, the median of {p['batches']} such batches "
             "per call (the Python and Triton launch path, which the GPU waits for when it is the longer). GPU µs: "
             "the call captured in a CUDA graph and replayed (- where it cannot be captured: it reads a value back). "
             "Host / GPU above 1: a call launched on its own is host-bound. In a model's prefill the launches queue "
             "behind the projections' and the MLP's GPU work (milliseconds per layer at these lengths), which hides "
             "a host time shorter than that.", "", *([p["note"], ""] if p.get("note") else []),
             "| N | call | host µs per call | GPU µs | host / GPU |", "|---|---|---|---|---|"]
    for case in p["rows"]:
        for r in case["rows"]:
            gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.0f}"
            ratio = "-" if r["gpu_us"] is None else f"{r['host_us'] / r['gpu_us']:.2f}"
            lines.append(f"| {case['n']} | `{r['call']}` | {r['host_us']:.0f} | {gpu} | {ratio} |")
    lines += ["", "Host-side changes, each undone by swapping the earlier step back in "
              f"({p.get('ab_text', ABS_TEXT)}), {p['rounds']} alternating rounds of 3 batches in one process; host µs "
              "per call, median:", "",
              "| N | call | change | with it | without it | with / without |", "|---|---|---|---|---|---|"]
    for case in p["rows"]:
        for r in case["ab"]:
            lines.append(f"| {case['n']} | `{r['call']}` | {r['change']} | {r['with_us']:.0f} | "
                         f"{r['without_us']:.0f} | {r['with_us'] / r['without_us']:.2f} |")
    update_markdown(f"Host time of the launch path ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
