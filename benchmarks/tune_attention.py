"""Kernel variants side by side on the GPU, on the same layouts and in one process: the warp-specialised Gluon kernel
(``block_sparse_hopper``, the default on Hopper), the Triton kernel with TMA descriptors and with pointer loads
(warps/stages), and cuDNN's dense attention as the yardstick. Layouts: random blocks (every head and row independent,
the worst case for L2 reuse), the same random blocks for every head (what K/V reuse across the query heads of a K/V
head is worth at equal density), the blocks ``block_topk`` picks on video-structured q/k, and all causal blocks.

    python benchmarks/tune_attention.py [--all | --hopper-only | --against FILE]

Prints ms and effective TF/s per variant and checks each against the first variant's output. For the Gluon kernel
it also reports the time of the same call replayed from a CUDA graph (GPU time alone) and the host time of one call
(what a short call pays in Python and launches when nothing else keeps the GPU busy). ``--all`` adds the Triton
kernel's other warps/stages combinations; ``--hopper-only`` is the Gluon kernel's schedule A/B: persistent programs
(one per SM) against one program per tile, each twice, interleaved; ``--against FILE`` is this tree's Gluon kernel
against another copy of ``block_sparse_hopper.py`` (an earlier commit's: ``git show REV:src/vidsparse/attention/
kernels/block_sparse_hopper.py > FILE``) in one process, in ``--rounds`` alternating timing rounds (median shown)
with the SM clock sampled through NVML during each variant's rounds, so that a drift of clock or temperature falls
on both alike; ``--tag`` names the results file (``tune_attention_against_TAG.json``). ``--lazy`` is the same
alternating A/B of this tree's Gluon kernel with its lazy rescale forced on and forced off (``lazy_rescale``), on
layouts whose width (blocks in the longest row, what the launch's default decides by) runs from 7 to 103
(``tune_attention_lazy[_TAG].json``); with ``--widths W,...`` instead on layouts of exactly those widths at each
of ``--sizes`` (around the default's threshold, ``LAZY_MIN_BLOCKS``): random ones, and/or ``block_topk``'s with
``--kinds pattern`` (a section per sweep, named by its layouts, widths and sizes). In both paired modes the GPU times
(CUDA-graph replays) alternate as well, ``--rounds`` of each (median shown)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, captured, causal_sdpa, flops, graph_ms, random_layout, video_qk  # noqa: E402
from common import (  # noqa: E402
    GpuMonitor,
    host_us,
    interleaved,
    load_copy,
    markdown_args,
    new_payload,
    rewrite_markdown,
    save,
    update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import BlockLayout  # noqa: E402
from vidsparse.attention.kernels import block_sparse as bs  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every Triton warps/stages combination")
    ap.add_argument("--hopper-only", action="store_true", help="the Gluon kernel's schedule A/B")
    ap.add_argument("--against", default="", help="A/B of the Gluon kernel against another copy of "
                    "block_sparse_hopper.py (e.g. an earlier commit's, from git show): each twice, interleaved")
    ap.add_argument("--lazy", action="store_true", help="the Gluon kernel's lazy rescale forced on against off")
    ap.add_argument("--widths", default="", help="with --lazy: layouts of these widths (blocks in the longest row), "
                    "comma-separated, at each of --sizes")
    ap.add_argument("--sizes", default="32768,65536", help="with --widths: sequence lengths")
    ap.add_argument("--kinds", default="random", help="with --widths: layouts, random and/or pattern (block_topk's "
                    "on video-structured q/k)")
    ap.add_argument("--rounds", type=int, default=4, help="with --against or --lazy: alternating timing rounds per "
                    "variant")
    ap.add_argument("--tag", default="", help="with --against or --lazy: suffix of the results file")
    ap.add_argument("--kv-heads", type=int, default=4, help="K/V heads (28 query heads): 4 (GQA) or 28")
    markdown_args(ap, "tune_attention_*")  # --note: what the compared copies were
    opts = ap.parse_args()
    if rewrite_markdown(opts, write_markdown):
        return
    other = _load_kernel(opts.against) if opts.against else None
    res = new_payload("tune_attention", "python benchmarks/tune_attention.py" + "".join(" " + a for a in sys.argv[1:]))
    h, hk, d = 28, opts.kv_heads, 128
    res["heads"], res["kv_heads"] = h, hk
    cases = [(131072, "pattern", 0.1), (131072, "random", 0.1), (131072, "random_shared", 0.1),
             (16384, "pattern", 0.05), (16384, "random", 0.05), (16384, "random_shared", 0.05), (32768, "pattern", 0.1),
             (32768, "dense", 1.0), (131072, "dense", 1.0)]
    if other is not None:  # the rows furthest from the targets: 64K at 5%
        cases[6:6] = [(65536, "random", 0.05), (65536, "pattern", 0.05)]
    if opts.lazy:  # widths 7, 26, 52, 103 (random rows); two block_topk layouts
        cases = [(16384, "random", 0.05), (32768, "random", 0.1), (32768, "random", 0.2), (65536, "random", 0.05),
                 (65536, "random", 0.1), (65536, "pattern", 0.1), (131072, "random", 0.05), (131072, "random", 0.1),
                 (131072, "pattern", 0.05)]
        if opts.widths:  # per-row counts ceil(rho × causal blocks) (block_topk's too): the last row's is exactly w
            cases = [(n, kind, (w - 0.5) / -(-n // 128)) for kind in opts.kinds.split(",")
                     for n in map(int, opts.sizes.split(",")) for w in map(int, opts.widths.split(","))]
    paired = other is not None or opts.lazy
    monitor = GpuMonitor() if paired else None
    for n, kind, rho in cases:
        if kind == "pattern":
            q, k, _, _ = video_qk(n // 256 - 1, 16, 16, h, hk, d)
            lay = PATTERNS.from_spec(f"block_topk:density={rho}").estimate(q, k, SeqMeta())
        else:
            q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
            # random_shared: one random layout for every head, so that the query heads of a K/V head read the same
            # blocks (as dense does): against "random", what L2 reuse of K/V is worth at the same density
            lay = BlockLayout.dense(n, n, device="cuda") if kind == "dense" else \
                random_layout(1 if kind == "random_shared" else h, n, rho)
        v = torch.randn_like(k)
        dens = lay.density()
        args = (q, k, v, lay.kv_index, lay.kv_count, 128, 128, True, None)
        variants = {"hopper": lambda: bs.block_sparse_attention(*args, hopper=True),
                    "triton_tma": lambda: bs.block_sparse_attention(*args, tma=True, hopper=False),
                    "triton_pointer": lambda: bs.block_sparse_attention(*args, hopper=False)}
        for regs in (232, 224):
            variants[f"hopper_regs{regs}"] = lambda regs=regs: _hopper(args, consumer_regs=regs)
        if opts.hopper_only:  # persistent and one program per tile, each twice, interleaved against ordering effects
            per, tile = (lambda: _hopper(args, persistent=True)), (lambda: _hopper(args, persistent=False))
            variants = {"hopper_persistent": per, "hopper_per_tile": tile, "hopper_persistent_again": per,
                        "hopper_per_tile_again": tile}
        if paired:  # this tree's kernel against the other copy (or lazy against eager), in alternating rounds
            if opts.lazy:
                pair = {"hopper_lazy": lambda: _hopper(args, lazy_rescale=True),
                        "hopper_eager": lambda: _hopper(args, lazy_rescale=False)}
            else:
                pair = {"hopper": lambda: _hopper(args), "hopper_against": lambda: _hopper(args, kernel=other)}
            outs = {name: fn() for name, fn in pair.items()}
            ref = next(iter(outs.values()))
            timed = interleaved(pair, lambda fn: bench_ms(fn, rep_ms=200), opts.rounds, monitor)
            graphs = {name: captured(fn) for name, fn in pair.items()}  # GPU time alone, alternating as well
            replayed = interleaved({name: g.replay for name, g in graphs.items()},
                                   lambda fn: bench_ms(fn, rep_ms=200), opts.rounds)
            del graphs
            for name, fn in pair.items():
                row = {"n": n, "layout": kind, "density": dens, "width": lay.kv_index.shape[-1], "variant": name,
                       **timed[name], "tflops": flops(h, n, d, dens) / timed[name]["ms"] / 1e9,
                       "max_diff": float((outs[name].float() - ref.float()).abs().max()),
                       "graph_ms": replayed[name]["ms"], "graph_rounds": replayed[name]["rounds"],
                       "host_us": host_us(fn)}
                res["rows"].append(row)
                print(row, flush=True)
            variants = {}
            if opts.lazy:
                del q, k, v, lay
                torch.cuda.empty_cache()
                continue
        if kind == "dense":
            variants["sdpa_cudnn"] = causal_sdpa("cudnn", q, k.repeat_interleave(h // hk, 1),
                                                 v.repeat_interleave(h // hk, 1))
        for w, st in ((8, 2), (8, 4), (4, 3)) if opts.all else ():
            variants[f"tma_w{w}_s{st}"] = lambda w=w, st=st: bs.block_sparse_attention(*args, tma=True, num_warps=w,
                                                                                        num_stages=st)
            variants[f"pointer_w{w}_s{st}"] = lambda w=w, st=st: bs.block_sparse_attention(*args, num_warps=w,
                                                                                            num_stages=st)
        ref = ref if paired else None  # against mode: the extra rows (cuDNN) are compared with this tree's
        for name, fn in variants.items():
            try:
                out = fn()
                ref = out if ref is None else ref
                err = float((out.float() - ref.float()).abs().max())
                ms = bench_ms(fn, rep_ms=300)
                row = {"n": n, "layout": kind, "density": dens, "variant": name, "ms": ms,
                       "tflops": flops(h, n, d, dens) / ms / 1e9, "max_diff": err}
                if name.startswith("hopper"):
                    row.update(graph_ms=graph_ms(fn), host_us=host_us(fn))
            except Exception as exc:
                row = {"n": n, "layout": kind, "variant": name,
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            res["rows"].append(row)
            print(row, flush=True)
        del q, k, v, lay
        torch.cuda.empty_cache()
    if other is not None:
        res["against"] = opts.against
    if paired:
        monitor.close()
    tag = f"_{opts.tag}" if opts.tag else ""
    save("tune_attention" + (f"_against{tag}" if other is not None else f"_lazy{tag}" if opts.lazy else
                             "_hopper" if opts.hopper_only else ""), res)
    write_markdown(res)


def write_markdown(res):
    """One BENCHMARKS.md section per mode (all variants; the Gluon kernel's schedule A/B)."""
    ab = "--hopper-only" in res.get("command", "")
    lazy = "--lazy" in res.get("command", "")
    clocked = any("rounds" in r for r in res["rows"])
    graph_rounds = any("graph_rounds" in r for r in res["rows"])
    against = f": A/B against `{res['against']}`" if res.get("against") else ""
    heads = f"{res.get('heads', 28)}/{res.get('kv_heads', 4)}"
    against += f", {heads} heads" if against and heads != "28/4" else ""  # its own section
    if lazy:
        widths = ""
        if "--widths" in res.get("command", ""):  # one section per sweep: its layouts, widths and sizes
            sizes = ", ".join(f"{n // 1024}K" for n in sorted({r["n"] for r in res["rows"]}))
            kinds = "/".join(sorted({r["layout"] for r in res["rows"]}))
            ws = sorted({r["width"] for r in res["rows"]})
            widths = f", {kinds} widths {ws[0]}–{ws[-1]} at {sizes}"
        against = f": lazy rescale A/B{widths}{f', {heads} heads' if heads != '28/4' else ''}"
    mode = ": persistent schedule A/B" if ab and not against else against
    title = f"Attention kernel variants{mode} ({res['device']})"
    lines = [f"{res['date']}, `{res['command']}`: the same layouts through each variant in one process, {heads} heads, "
             "d = 128, bf16, causal; `max diff` is against the first variant of the row group. `graph ms`: the same "
             "call replayed from a CUDA graph (GPU time alone); `host µs`: Python and launch time of one call." +
             (" `ms` is the median of alternating rounds (`rounds ms`); `SM MHz` the median clock NVML sampled during "
              "that variant's rounds." if clocked else "") +
             (" `graph ms` is the median of alternating replay rounds as well." if graph_rounds else "") +
             (f" {res['note']}" if res.get("note") else ""), "",
             "| N | layout | density | variant | ms | TF/s | graph ms | host µs | max diff |" +
             (" rounds ms | SM MHz |" if clocked else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if clocked else "")]
    for r in res["rows"]:
        extra = f"{r['graph_ms']:.2f} | {r['host_us']:.0f}" if "graph_ms" in r else "- | -"
        rounds = " / ".join(f"{x:.2f}" for x in r.get("rounds", []))
        more = f" {rounds} | {r.get('sm_mhz', '-')} |" if clocked else ""
        if "ms" in r:
            layout = r["layout"] + (f", width {r['width']}" if "width" in r else "")
            lines.append(f"| {r['n']} | {layout} | {r['density']:.3f} | {r['variant']} | {r['ms']:.2f} | "
                         f"{r['tflops']:.0f} | {extra} | {r['max_diff']:.3g} |" + more)
        else:
            lines.append(f"| {r['n']} | {r['layout']} | - | {r['variant']} | {r['error']} | | | | |" +
                         (" | |" if clocked else ""))
    update_markdown(title, "\n".join(lines))


def _hopper(args, kernel=None, **kw):
    from vidsparse.attention.kernels import block_sparse_hopper

    q, k, v, idx, cnt, _, _, causal, _ = args
    return (kernel or block_sparse_hopper).block_sparse_attention_hopper(q, k, v, idx, cnt, causal, q.shape[-1] ** -0.5,
                                                                         **kw)


def _load_kernel(path: str):
    """Another copy of ``block_sparse_hopper.py`` as a module of the vidsparse package (its relative imports
    resolve)."""
    return load_copy(path, "vidsparse.attention.kernels._against")


if __name__ == "__main__":
    main()
