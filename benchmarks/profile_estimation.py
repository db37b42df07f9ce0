"""Where a pattern's estimation spends its GPU time: torch.profiler over a few calls at one size, kernels ranked by
total CUDA time (the breakdown behind the estimation rows of ``benchmarks/attention.py``).

    python benchmarks/profile_estimation.py [--n 131072] [--specs "block_topk:density=0.1;xattention:stride=16"]
        [--select-warps 1,2,4,8] [--env-ab VAR=v1,v2] [--module-ab MODULE=FILE] [--with-kernel] [--tag T]

Specs are separated by ";" (a spec's own settings by ","). Each row has the mean ms per call (``do_bench``: host
launch overhead included where it dominates) and the GPU ms (the call captured in a CUDA graph and replayed) of the
estimate as a model's prefill calls it in every layer (``Pattern.layout``): a static pattern (``dense``,
``sink_window``, ``power``, ``radial``) builds its layout once per shape, so its rows also have that build's times
(``build_ms``, ``build_gpu_ms``); the kernel profile is of the build.

Saves ``profile_estimation.json`` (per spec: the mean ms per call and the top kernels). ``--select-warps``: first
times each spec's estimation with the block-selection kernels (``kernels.block_select``) launched with each number of
warps per row program, interleaved twice, in the same process; saves ``select_warps`` rows and prints the fastest.
``--env-ab VAR=v1,v2`` does the same for any environment variable a kernel wrapper reads at each call (``env_ab``
rows, with GPU ms from graph replay), e.g. ``VIDSPARSE_SELECT_SPLIT=0,1`` for the selection's row split.
``--module-ab MODULE=FILE`` times each spec's estimation with the kernel module ``MODULE`` (e.g.
``vidsparse.attention.kernels.block_select``) as it is and as loaded from ``FILE`` (an earlier copy of it, e.g. ``git
show REV:src/vidsparse/attention/kernels/block_select.py > before.py``), interleaved twice in this process: the
patterns import their kernel functions at each call, so swapping the module in ``sys.modules`` swaps the kernels
(``module_ab`` rows, values "before" and "current").
``--with-kernel`` also times the attention kernel on the layout each spec picks (random v) and reports the
estimation's GPU time as a share of it: the issue's "estimation ≤ 10% of kernel time" on the pattern's own layout.
The kernel is timed as launched (``attention_ms``, the share tables' figure) and, since 2026-11-29, also as graph
replays (``attention_gpu_ms``, ``estimate_share_gpu``: GPU time against GPU time; not yet in the tables). Where the
call's launch path takes about as long as its kernels (16K tokens at 5% density) the two differ. A call that cannot
be captured (a token layout's execution trims its index on the host) has the sum of its kernels' GPU times instead
(``attention_kernel_ms``, ``estimate_share_kernels``; torch.profiler over 5 calls), in the tables beside the
launched figure.
It also times reading q and k once (``read_floor``): at the bandwidth reached, a floor for any estimate that pools
all of q.
``--video`` takes video-structured q/k (``attention.video_qk``: a 256-token text prefix, then frames of 16×16
tokens, M-RoPE) and passes the visual span, tokens per frame and frame size in the metadata, so that ``grid`` runs
too (its share table is a section of its own). Each row also has the estimate's peak GPU memory over what was
allocated before it (``peak_gb``).
``--recall`` (with ``--video``) also measures each layout's attention-mass recall (``attention.recall``: the exact
softmax mass of 256 sampled query rows that the layout keeps), printed and, with ``--markdown-from``, beside each
cell. ``--section S`` names the BENCHMARKS.md section (", S" after the default title) so that a table of other
specs does not replace the main one.
``--tag`` saves ``profile_estimation_TAG.json``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, graph_ms, recall, video_qk  # noqa: E402
from common import device_name, kernel_times, save, today, update_markdown  # noqa: E402

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402


def profile(spec: str, q, k, meta, calls: int = 5, top: int = 12) -> dict:
    """The estimate as a model's prefill calls it in every layer (``Pattern.layout``: a static pattern's layout is
    built once per shape and then looked up), its GPU kernels, and its peak memory; for a static pattern also what
    the first build takes (``build_ms``, ``build_gpu_ms``)."""
    pat = PATTERNS.from_spec(spec)
    ms = bench_ms(lambda: pat.layout(q, k, meta), rep_ms=200)
    gpu_ms = graph_ms(lambda: pat.layout(q, k, meta))
    build = {}
    if pat.capabilities.get("static"):
        build = {"build_ms": bench_ms(lambda: pat.estimate(q, k, meta), rep_ms=200),
                 "build_gpu_ms": graph_ms(lambda: pat.estimate(q, k, meta))}
        print(f"{spec}: static, built once per shape: {build['build_ms']:.3f} ms per build (do_bench), GPU "
              f"{build['build_gpu_ms'] or float('nan'):.3f} ms (graph)", flush=True)
    rows = kernel_times(lambda: pat.estimate(q, k, meta), calls)
    total = sum(r["ms_per_call"] for r in rows)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lay = pat.estimate(q, k, meta)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    del lay
    print(f"{spec}: {ms:.2f} ms per call (do_bench), GPU {gpu_ms or float('nan'):.2f} ms (graph); kernels "
          f"{total:.2f} ms; peak {peak:.2f} GB", flush=True)
    for r in rows[:top]:
        print(f"  {r['ms_per_call']:7.3f} ms  x{r['count_per_call']:<4g} {r['kernel'][:110]}", flush=True)
    return {"spec": spec, "ms": ms, "gpu_ms": gpu_ms, "kernel_ms": total, "kernels": rows[:top], "peak_gb": peak,
            **build}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--specs", default="block_topk:density=0.1", help="method specs separated by ';'")
    ap.add_argument("--kv-heads", type=int, default=4, help="K/V heads (28 query heads): 4 (GQA) or 28")
    ap.add_argument("--select-warps", default="", help="comma list of warp counts to compare for the selection kernels")
    ap.add_argument("--env-ab", default="", help="VAR=v1,v2[,...]: each spec's estimation per value of an environment "
                    "variable the kernels read (e.g. VIDSPARSE_SELECT_SPLIT=0,1), interleaved")
    ap.add_argument("--module-ab", default="", help="MODULE=FILE: each spec's estimation with the kernel module "
                    "as it is and as an earlier copy loaded from FILE, interleaved")
    ap.add_argument("--antidiagonal", default="", help="xattention's fused kernel configs to compare, as "
                    "BM/BN/warps/stages/loads/splits[/width][,...] with loads tma or ptr, splits the programs per "
                    "row tile and width the head-dim slice per product step (default: all of D) (e.g. "
                    "128/256/8/2/tma/2,128/128/4/3/tma/4/64), at strides 8 and 16")
    ap.add_argument("--with-kernel", action="store_true", help="time the kernel on each spec's layout too")
    ap.add_argument("--video", action="store_true", help="video-structured q/k with the visual span in the metadata "
                    "(grid runs too)")
    ap.add_argument("--recall", action="store_true", help="with --video: each layout's attention-mass recall")
    ap.add_argument("--section", default="", help="with --markdown-from: a suffix of the BENCHMARKS.md section title")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--markdown-from", default="", help="comma list of --with-kernel results JSON (one per N): write "
                    "their table to BENCHMARKS.md")
    ap.add_argument("--note", default="", help="with --markdown-from: a sentence added to the section")
    ap.add_argument("--antidiagonal-markdown-from", default="", help="comma list of --antidiagonal results JSON: "
                    "write their configurations' table to BENCHMARKS.md (with --note)")
    args = ap.parse_args()
    if args.antidiagonal_markdown_from:
        import json

        write_antidiagonal_markdown([(f, json.loads(Path(f).read_text()))
                                     for f in args.antidiagonal_markdown_from.split(",")], args.note)
        return
    if args.markdown_from:
        import json

        write_share_markdown([json.loads(Path(f).read_text()) for f in args.markdown_from.split(",")], args.note,
                             args.section)
        return
    h, hk, d = 28, args.kv_heads, 128
    if args.recall and not (args.video and args.with_kernel):
        raise SystemExit("--recall needs --video (recall on random q/k says nothing) and --with-kernel")
    if h % hk:
        raise SystemExit(f"--kv-heads {hk} does not divide the {h} query heads")
    if args.video:
        if args.n % 256 or args.n < 512:
            raise SystemExit("--video takes --n as a multiple of 256 (a 256-token prefix, then 16×16 frames)")
        q, k, text, tpf = video_qk(args.n // 256 - 1, 16, 16, h, hk, d)
        meta = SeqMeta(128, 128, True, visual=(text, args.n), tokens_per_frame=tpf, frame_hw=(16, 16))
    else:
        q = torch.randn(1, h, args.n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hk, args.n, d, device="cuda", dtype=torch.bfloat16)
        meta = SeqMeta(128, 128, True)
    res = {"benchmark": "profile_estimation", "date": today(), "device": device_name(), "n": args.n,
           "heads": h, "kv_heads": hk, "video": args.video,
           "command": "python benchmarks/profile_estimation.py " + " ".join(sys.argv[1:]),
           "per_layer": True}  # rows time ``Pattern.layout``: static patterns' layouts cached per shape
    specs = args.specs.split(";")  # a spec's own options are comma-separated
    if args.select_warps:
        res["select_warps"] = env_ab(specs, "VIDSPARSE_SELECT_WARPS", args.select_warps.split(","), q, k, meta)
    if args.env_ab:
        var, values = args.env_ab.split("=", 1)
        res["env_ab"] = env_ab(specs, var, values.split(","), q, k, meta)
    if args.module_ab:
        name, path = args.module_ab.split("=", 1)
        res["module_ab"] = module_ab(specs, name, path, q, k, meta)
    if args.antidiagonal:
        res["antidiagonal"] = antidiagonal_configs(args.antidiagonal.split(","), q, k)
    res["rows"] = [profile(s, q, k, meta) for s in specs]
    if args.with_kernel:
        res["read_floor"] = read_floor(q, k)
        res["graph_floor"] = graph_floor()
        from vidsparse.attention import sparse_attention

        v = torch.randn_like(k)
        sampled = torch.linspace(args.n // 8, args.n - 1, 256, device="cuda").long()  # --recall's query rows
        for row in res["rows"]:
            lay = PATTERNS.from_spec(row["spec"]).estimate(q, k, meta)
            row["layout_density"] = float(lay.density())
            call = lambda lay=lay: sparse_attention(q, k, v, lay)  # noqa: E731
            row["attention_ms"] = bench_ms(call, rep_ms=400)
            row["estimate_share"] = (row["gpu_ms"] or row["ms"]) / row["attention_ms"]
            # the kernel's GPU time alone (graph replay), as the estimate's is: where launching the call takes about
            # as long as its kernels (16K tokens at 5% density), the time as launched above includes host time
            try:
                row["attention_gpu_ms"] = graph_ms(call)
            except Exception as exc:  # report, keep measuring the rest
                row["attention_gpu_ms"], row["graph_error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
            if row["attention_gpu_ms"] and row["gpu_ms"]:
                row["estimate_share_gpu"] = row["gpu_ms"] / row["attention_gpu_ms"]
            elif row["gpu_ms"]:  # a call that syncs with the host (a token layout's trim) cannot be captured: the
                # sum of its kernels' GPU times (torch.profiler over 5 calls) instead, the gaps between them left out
                row["attention_kernel_ms"] = sum(x["ms_per_call"] for x in kernel_times(call, 5))
                row["estimate_share_kernels"] = row["gpu_ms"] / row["attention_kernel_ms"]
            if args.recall:
                row["recall"] = recall(q, k, lay, sampled)
                print(f"{row['spec']}: recall {row['recall']:.4f}", flush=True)
            print(f"{row['spec']}: layout density {row['layout_density']:.3f}, attention {row['attention_ms']:.2f} ms, "
                  f"estimation {100 * row['estimate_share']:.1f}% of it"
                  + (f"; GPU alone {row['attention_gpu_ms']:.3f} ms, {100 * row['estimate_share_gpu']:.1f}%"
                     if "estimate_share_gpu" in row else "")
                  + (f"; its kernels {row['attention_kernel_ms']:.3f} ms, {100 * row['estimate_share_kernels']:.1f}%"
                     if "estimate_share_kernels" in row else ""), flush=True)
    save("profile_estimation" + (f"_{args.tag}" if args.tag else ""), res)


@triton.jit
def _stream_sum(X, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """One fp32 partial sum per program over ITERS × BLOCK consecutive elements: a plain streaming read."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):  # unrolled: all of a program's loads are in flight together
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc))


def stream_sum(x: torch.Tensor, block: int = 4096, iters: int = 8) -> torch.Tensor:
    """x (contiguous) -> float32 partial sums, one per ``block`` × ``iters`` elements."""
    x = x.contiguous().view(-1)
    out = torch.empty(triton.cdiv(x.numel(), block * iters), dtype=torch.float32, device=x.device)
    _stream_sum[(out.numel(),)](x, out, x.numel(), BLOCK=block, ITERS=iters, num_warps=8)
    return out


def read_floor(q, k) -> dict:
    """What reading q and k once costs on this card, GPU ms from graph replay and the bandwidth reached, by the
    faster of two reads: torch's sum of each to a scalar (fp32 accumulation) and a plain Triton streaming read
    (``stream_sum``). At the bandwidth these reads reach, that is a floor for a pattern that pools all of q
    (``block_topk``, ``pyramid``, ``pbs``)."""
    nbytes = q.numel() * q.element_size() + k.numel() * k.element_size()
    reads = {"torch_sum": lambda: (q.sum(dtype=torch.float32), k.sum(dtype=torch.float32)),
             "stream": lambda: (stream_sum(q), stream_sum(k))}
    out = {"bytes": nbytes, "ms_by_read": {name: graph_ms(fn) for name, fn in reads.items()}}
    out["read"], out["gpu_ms"] = min(out["ms_by_read"].items(), key=lambda kv: kv[1])
    out["tb_per_s"] = nbytes / (out["gpu_ms"] * 1e-3) / 1e12
    print(f"read q and k once: {out['ms_by_read']} ms, {nbytes / 1e6:.0f} MB, best {out['tb_per_s']:.2f} TB/s",
          flush=True)
    return out


def graph_floor() -> dict:
    """What a graph replay costs with next to no work in it: GPU ms of 1, 2 and 5 launches of a 16-element add,
    as ``graph_ms`` times every estimate. Part of each short estimate's figure is this, not its kernels."""
    x = torch.zeros(16, device="cuda")
    out = {str(n): graph_ms(lambda n=n: [x.add_(1) for _ in range(n)]) for n in (1, 2, 5)}
    print(f"graph replay of 1 / 2 / 5 tiny kernels: {out} ms", flush=True)
    return out


def write_share_markdown(runs: list[dict], note: str = "", section: str = "") -> None:
    """One table from ``--with-kernel`` runs: per spec and N, the estimation's GPU ms against the kernel's ms on the
    layout that estimation picked (and the layout's recall where measured)."""
    runs = sorted(runs, key=lambda r: r["n"])
    specs = [r["spec"] for r in runs[0]["rows"]]
    kv = runs[0].get("kv_heads", 4)
    video = runs[0].get("video", False)
    if any(r.get("kv_heads", 4) != kv or r.get("video", False) != video for r in runs):
        raise ValueError("one table takes runs of one head configuration and one kind of input")
    inputs = ("Video-structured q/k (`attention.video_qk`: 256 text tokens, then 16×16-token frames, M-RoPE; the "
              "visual span, tokens per frame and frame size in the metadata)" if video else "Random q/k")
    lines = [f"{runs[0]['date']}, {runs[0]['device']}: `{'`; `'.join(r['command'] for r in runs)}`. {inputs} "
             f"({runs[0].get('heads', 28)} heads / {kv} KV heads, d = 128, bf16), causal; per cell: the "
             "estimation's GPU ms (CUDA-graph replay)" + (" as a model's prefill calls it in each layer"
                                                          if runs[0].get("per_layer") else "") + " "
             "/ the kernel's ms on the layout it picked (density in brackets) = the estimation's share. The issue "
             "asks for ≤ 10%." + (f" {note}" if note else ""), "",
             "| spec | " + " | ".join(f"N = {r['n']}" for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for spec in specs:
        cells = []
        for r in runs:
            e = next(x for x in r["rows"] if x["spec"] == spec)
            cells.append(f"{e['gpu_ms'] or e['ms']:.2f} / {e['attention_ms']:.2f} ({e['layout_density']:.2f}) = "
                         f"**{100 * e['estimate_share']:.1f}%**" + (f", recall {e['recall']:.4f}" if "recall" in e
                                                                     else "")
                         + (f" (its kernels alone, a host sync between them: {e['attention_kernel_ms']:.2f} ms, "
                            f"{100 * e['estimate_share_kernels']:.1f}%)" if "attention_kernel_ms" in e else "")
                         + (f" (static: built once per shape, {e['build_gpu_ms'] or e['build_ms']:.2f} ms)"
                            if "build_ms" in e else ""))
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    if all("read_floor" in r for r in runs):
        lines.append("| reading q and k once (the faster of torch's sums and a streaming Triton read): a floor for "
                     "any estimate that pools all of q | " + " | ".join(
                         f"{r['read_floor']['gpu_ms']:.3f} ms ({r['read_floor']['tb_per_s']:.2f} TB/s, "
                         f"{r['read_floor']['read']})" for r in runs) + " |")
    heads = ("" if kv == 4 else f", {runs[0].get('heads', 28)}/{kv} heads") + (", video q/k" if video else "") + \
        (f", {section}" if section else "")
    update_markdown(f"Estimation against the kernel on its own layout{heads} ({runs[0]['device']})", "\n".join(lines))


def write_antidiagonal_markdown(runs: list[tuple[str, dict]], note: str = "") -> None:
    """One table from ``--antidiagonal`` runs: per run (a process), N and stride, each configuration's ms in its
    alternating repetitions."""
    lines = [f"{runs[0][1]['device']}, 28 heads / 4 KV heads, d = 128, bf16, causal, random q/k: xattention's "
             "block-mass kernel alone (`kernels/antidiagonal.py`), per launch configuration "
             "BM/BN/warps/stages/loads/splits[/width] (loads: `tma` descriptors or `ptr` strided pointer loads; "
             "`gluon`: a warp-specialised Gluon version, since reverted; splits: programs per row tile; width: "
             "head-dim columns per product step, D when absent). The configurations of a run alternate; each cell "
             "lists its repetitions in ms." + (f" {note}" if note else ""), "",
             "| run | N | stride | config | ms |", "|---|---|---|---|---|"]
    for path, r in runs:
        cells: dict = {}
        for x in r["antidiagonal"]:
            cells.setdefault((x["stride"], x["config"]), []).append(f"{x['ms']:.2f}" if "ms" in x else "did not fit")
        for (stride, cfg), ms in cells.items():
            lines.append(f"| `{Path(path).name}` ({r['date']}) | {r['n']} | {stride} | {cfg} | {', '.join(ms)} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for _, r in runs) + "."]
    update_markdown(f"xattention estimation kernel: launch configurations ({runs[0][1]['device']})", "\n".join(lines))


def env_ab(specs, var, values, q, k, meta) -> list[dict]:
    """Each spec's estimation per value of the environment variable ``var`` (read by the kernels' wrappers at each
    call), twice, interleaved in this process: the mean ms per call (``do_bench``) and the GPU ms (graph replay)."""
    import os

    rows = []
    before = os.environ.get(var)  # the caller's own setting comes back afterwards, also after an error
    try:
        for spec in specs:
            pat = PATTERNS.from_spec(spec)
            for rep in range(2):
                for v in values:
                    os.environ[var] = v
                    fn = lambda pat=pat: pat.estimate(q, k, meta)  # noqa: E731
                    rows.append({"spec": spec, "var": var, "value": v, "rep": rep, "ms": bench_ms(fn, rep_ms=200),
                                 "gpu_ms": graph_ms(fn)})
                    print(rows[-1], flush=True)
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before
    best = min(values, key=lambda v: sum(r["gpu_ms"] or r["ms"] for r in rows if r["value"] == v))
    print(f"fastest over all specs: {var}={best}", flush=True)
    return rows


def module_ab(specs, name, path, q, k, meta) -> list[dict]:
    """Each spec's estimation with the module ``name`` as imported ("current") and as loaded from the file ``path``
    ("before"), twice, interleaved in this process: the mean ms per call (``do_bench``) and the GPU ms (graph
    replay). The patterns import their kernel functions at each call, so the module in ``sys.modules`` decides."""
    import importlib
    import importlib.util

    current = importlib.import_module(name)
    spec_ = importlib.util.spec_from_file_location(name + "_before", path)
    before = importlib.util.module_from_spec(spec_)
    before.__package__ = name.rpartition(".")[0]  # its relative imports resolve as the current module's do
    sys.modules[spec_.name] = before  # registered while it runs: a dataclass there looks its module up by name
    try:
        spec_.loader.exec_module(before)
    finally:
        sys.modules.pop(spec_.name, None)
    rows = []
    try:
        for spec in specs:
            pat = PATTERNS.from_spec(spec)
            for rep in range(2):
                for value, mod in (("before", before), ("current", current)):
                    sys.modules[name] = mod
                    fn = lambda pat=pat: pat.estimate(q, k, meta)  # noqa: E731
                    rows.append({"spec": spec, "module": name, "file": path, "value": value, "rep": rep,
                                 "ms": bench_ms(fn, rep_ms=200), "gpu_ms": graph_ms(fn)})
                    print(rows[-1], flush=True)
    finally:
        sys.modules[name] = current
    return rows


def antidiagonal_configs(configs, q, k) -> list[dict]:
    """xattention's fused kernel (``kernels.antidiagonal``) per launch configuration, twice, interleaved. A
    configuration without a width steps through all of D at once, whatever the kernel's default, so that a
    configuration string means the same launch in every run."""
    from vidsparse.attention.kernels.antidiagonal import antidiagonal_block_mass

    rows = []
    for stride in (8, 16):
        for rep in range(2):
            for cfg in configs:
                bm, bn, warps, stages, loads, splits, *width = cfg.split("/")
                fn = lambda: antidiagonal_block_mass(q, k, stride, 128, 128, True, block_m=int(bm),  # noqa: E731
                                                     block_n=int(bn), num_warps=int(warps), num_stages=int(stages),
                                                     tma=loads == "tma", splits=int(splits),
                                                     block_d=int(width[0]) if width else q.shape[-1])
                try:
                    rows.append({"stride": stride, "config": cfg, "rep": rep, "ms": bench_ms(fn, rep_ms=200)})
                except Exception as e:  # a configuration that does not fit (shared memory, registers)
                    rows.append({"stride": stride, "config": cfg, "rep": rep, "error": str(e)[:200]})
                print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
