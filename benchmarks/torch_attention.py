"""``sparse_attention`` without the Triton kernel: the block-wise torch path (``attention/blockwise.py``, backend
"torch", what "auto" runs on the CPU, on GPUs older than Ampere and with Triton older than 3.4) against dense causal
SDPA and the dense fp32 oracle (backend "reference", what that path was before), on the same device: time and peak
memory. On a GPU the Triton kernel runs too, for scale.

    python benchmarks/torch_attention.py [--n 4096,8192,16384] [--densities 0.05,0.1,0.2] [--heads 28/4]

Layouts: per head and query block the diagonal plus random causal blocks up to the density (``attention.py``'s
``random_layout``), 128×128 blocks, d = 128, batch 1; fp32 inputs on the CPU, bf16 on a GPU. Peak memory is what a
call adds above its inputs and layout: on a GPU ``max_memory_allocated``; on the CPU the peak resident size of a
child process that runs only that call (torch's CPU allocator is invisible to tracemalloc), so it includes what the
C allocator keeps of freed chunks. The oracle runs only where its estimated need (3 dense fp32 [H, N, N] tensors)
fits ``--oracle-gb``."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import random_layout  # noqa: E402
from common import device_name, save, today, update_markdown, versions  # noqa: E402

from vidsparse.attention import sparse_attention  # noqa: E402
from vidsparse.attention.blockwise import default_budget  # noqa: E402

SECTION = "Sparse attention without the kernel"


def inputs(n: int, h: int, hk: int, d: int, device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, h, n, d, device=device, generator=g, dtype=dtype)
    k, v = (torch.randn(1, hk, n, d, device=device, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def callable_for(kind: str, q, k, v, density: float):
    """The call measured: "sdpa" (dense causal, K/V expanded for GQA; torch's choice of backend), "sdpa_efficient"
    (the same on the memory-efficient backend, the one SDPA has on GPUs older than Ampere), "reference", "torch" or
    "kernel" on a random layout at ``density``."""
    if kind.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        if kind == "sdpa":
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)

        def efficient():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return efficient
    lay = random_layout(q.shape[1], q.shape[2], density, device=q.device.type)
    return lambda: sparse_attention(q, k, v, lay, backend=kind)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, n: int, density: float, h: int, hk: int, d: int, device: str, reps: int) -> dict:
    """One call's peak memory (first run) and median time (``reps`` more runs)."""
    q, k, v = inputs(n, h, hk, d, device)
    fn = callable_for(kind, q, k, v, density)
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    sync(device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_mib": peak / 2**20}


def run(kind: str, n: int, density: float, args, device: str) -> dict:
    """``measure`` in this process on a GPU; in a child process on the CPU (the resident peak is per process)."""
    if device == "cuda":
        try:
            return measure(kind, n, density, args.h, args.hk, args.d, device, args.reps)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return {"error": f"out of memory: {str(exc).splitlines()[0][:120]}"}
    spec = json.dumps([kind, n, density, args.h, args.hk, args.d, device, args.reps])
    res = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="")
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--heads", default="28/4")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=0, help="timed runs per call (default: 3 on the CPU, 10 on a GPU)")
    ap.add_argument("--oracle-gb", type=float, default=0.0,
                    help="run the oracle where it needs at most this (default: half the device's memory)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--markdown-from", default="", help="a saved torch_attention.json: rewrite its table only")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    if args.markdown_from:
        write_markdown(json.loads(Path(args.markdown_from).read_text()))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.h, args.hk = (int(x) for x in args.heads.split("/"))
    args.reps = args.reps or (10 if device == "cuda" else 3)
    sizes = [int(x) for x in (args.n or ("16384,32768,65536" if device == "cuda" else "4096,8192,16384")).split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    if not args.oracle_gb:
        total = (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
                 else int(open("/proc/meminfo").read().split()[1]) * 1024)
        args.oracle_gb = total / 2 / 1e9
    kinds = ["torch"] + (["kernel"] if device == "cuda" else [])
    rows = []
    for n in sizes:
        dense = {kind: run(kind, n, 1.0, args, device) for kind in ["sdpa"] + (["sdpa_efficient"] if device == "cuda"
                                                                              else [])}
        oracle_gb = 3 * args.h * n * n * 4 / 1e9
        for rho in densities:
            row = {"n": n, "heads": args.heads, "density": rho, **dense, "oracle_need_gb": oracle_gb}
            row["reference"] = (run("reference", n, rho, args, device) if oracle_gb <= args.oracle_gb
                                else {"skipped": f"needs about {oracle_gb:.0f} GB"})
            for kind in kinds:
                row[kind] = run(kind, n, rho, args, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cmd = "python benchmarks/torch_attention.py" + "".join(
        f" --{k} {v}" for k, v in (("n", args.n), ("heads", args.heads)) if v and not (k == "heads" and v == "28/4"))
    res = {"benchmark": "torch_attention", "date": today(), "device": device_name(), **versions("torch"),
           "command": cmd, "dtype": "bf16" if device == "cuda" else "fp32", "d": args.d, "reps": args.reps,
           "budget_mib": default_budget(device) / 2**20, "rows": rows}
    save("torch_attention", res)
    write_markdown(res)


def cell(x: dict) -> str:
    if "ms" in x:
        return f"{x['ms']:.1f} ({x['peak_mib']:,.0f} MiB)"
    return x.get("skipped") or x.get("error", "")


def write_markdown(res: dict) -> None:
    """The BENCHMARKS.md section of one device's run (one subsection per device)."""
    gpu = any("kernel" in r for r in res["rows"])
    ratio = lambda a, b: f"{a['ms'] / b['ms']:.1f}x" if "ms" in a and "ms" in b else ""  # noqa: E731
    head = ("| N | heads/KV | dense SDPA ms (peak) |" + (" dense SDPA, memory-efficient backend ms (peak) |" if gpu
                                                          else "")
            + " density | fp32 oracle ms (peak) | torch path ms (peak) | torch path vs SDPA |"
            + (" vs memory-efficient | kernel ms (peak) | torch path / kernel |" if gpu else ""))
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in res["rows"]:
        t, s = r["torch"], r["sdpa"]
        line = (f"| {r['n']} | {r['heads']} | {cell(s)} |" + (f" {cell(r['sdpa_efficient'])} |" if gpu else "")
                + f" {r['density']:.2f} | {cell(r['reference'])} | {cell(t)} | {ratio(s, t)} |")
        if gpu:
            line += f" {ratio(r['sdpa_efficient'], t)} | {cell(r['kernel'])} | {ratio(t, r['kernel'])} |"
        lines.append(line)
    body = (f"Device: {res['device']} — {res['date']} — `{res['command']}` — {res['dtype']} inputs, d = {res['d']}, "
            f"batch 1, causal, 128×128 blocks, random layouts (the diagonal plus random causal blocks up to the "
            f"density); chunk budget {res['budget_mib']:.0f} MiB. Cells: median of {res['reps']} runs, ms (peak "
            "memory the call added, its output included). \"vs\" columns: how many times faster the torch path is "
            "than that dense call" + ("; the memory-efficient backend is the dense kernel SDPA has on GPUs older "
                                     "than Ampere, where the torch path is meant to run" if gpu else "")
            + ".\n\n" + "\n".join(lines))
    intro = ("What `sparse_attention` runs where the Triton kernel does not (`attention/blockwise.py`): only the "
             "listed blocks, gathered per (head, query block) and attended by torch's SDPA (with square blocks, rows "
             "of one width share one causal mask or none; otherwise under an element mask), in chunks of at most "
             "`VIDSPARSE_TORCH_ATTENTION_MB` MiB of temporaries (256 on the CPU, 1024 on a GPU). Before it, that path "
             "was the dense fp32 oracle, whose memory grows as H·N². Written by `benchmarks/torch_attention.py`.")
    update_markdown(f"{SECTION} ({res['device']})", intro + "\n\n" + body)


if __name__ == "__main__":
    main()
