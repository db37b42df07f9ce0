"""The pyramid's pooled K/V: the torch step (``block_sparse.pool_kv_torch``: ``layout.pool_levels``, an fp32 copy of
the keys and a mean per level, then a ``torch.cat``) against the one-pass kernel (``attention.kernels.pool``), alone
and inside the whole ``pyramid`` ``sparse_attention`` call, at 28 heads over 4 and over 28 K/V heads, with dense
cuDNN on the same inputs.

    python benchmarks/pyramid_pool.py [--sizes 16384,32768,65536,131072] [--kv-heads 4,28]
        [--markdown-from FILE [--note TEXT]]

q/k are video-structured (``attention.video_qk``: M-RoPE over 16×16-token frames) and ``pyramid`` (default spec)
picks its layout on them; v is random. The step pools k and v (both, as each call does). For the whole call the torch
step is swapped in for the kernel in the same process, and the callables run in alternating rounds; GPU ms is the
call captured in a CUDA graph and replayed. Saves ``pyramid_pool.json`` under the device's results and writes a
BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, causal_sdpa, graph_ms, video_qk  # noqa: E402
from common import (  # noqa: E402
    gpu_cell, interleaved, markdown_args, ms_cell, new_payload, rewrite_markdown, run_rows, swapped, update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import sparse_attention  # noqa: E402
from vidsparse.attention.kernels import block_sparse  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402

ROUND_MS = 200
H, D = 28, 128


def run_case(n: int, hk: int, monitor) -> dict:
    q, k, _, _ = video_qk(n // 256 - 1, 16, 16, H, hk, D)
    v = torch.randn_like(k)
    lay = PATTERNS.from_spec("pyramid").estimate(q, k, SeqMeta(128, 128, True))
    full = n // 128
    want, got = block_sparse.pool_kv_torch(k, full, 128)[0], block_sparse.pool_kv(k, full, 128)[0]
    same = bool(torch.equal(want, got))
    both = lambda f: lambda: (f(k, full, 128), f(v, full, 128))  # noqa: E731
    step = interleaved({"torch": both(block_sparse.pool_kv_torch), "kernel": both(block_sparse.pool_kv)},
                       lambda fn: bench_ms(fn, rep_ms=ROUND_MS), 3, monitor)
    # bytes the kernel must move: k and v read once, their three levels (7/8 of their size) written
    step["kernel"]["gb_s"] = 2 * k.numel() * k.element_size() * (1 + 7 / 8) / step["kernel"]["ms"] / 1e6
    whole_k = lambda: sparse_attention(q, k, v, lay)  # noqa: E731
    whole_t = swapped(block_sparse, "pool_kv", block_sparse.pool_kv_torch, whole_k)
    whole_diff = float((whole_k().float() - whole_t().float()).abs().max())
    cudnn = causal_sdpa("cudnn", q, k.repeat_interleave(H // hk, 1), v.repeat_interleave(H // hk, 1))
    whole = interleaved({"torch_pool": whole_t, "kernel_pool": whole_k, "cudnn": cudnn},
                        lambda fn: bench_ms(fn, rep_ms=ROUND_MS), 3, monitor)
    for name, fn in (("torch_pool", whole_t), ("kernel_pool", whole_k)):
        whole[name]["graph_ms"] = graph_ms(fn)
    res = {"n": n, "heads": H, "kv_heads": hk, "density": lay.density(), "step": step, "pooled_equal": same,
           "whole": whole, "whole_max_abs_diff": whole_diff,
           "step_speedup": step["torch"]["ms"] / step["kernel"]["ms"],
           "whole_speedup": whole["torch_pool"]["ms"] / whole["kernel_pool"]["ms"],
           "vs_cudnn": whole["cudnn"]["ms"] / whole["kernel_pool"]["ms"]}
    print(n, f"{H}/{hk}", f"density {res['density']:.3f}", {x: round(step[x]["ms"], 3) for x in step},
          {x: round(whole[x]["ms"], 3) for x in whole}, f"step {res['step_speedup']:.1f}x",
          f"whole {res['whole_speedup']:.2f}x", "pooled equal", same, "diff", whole_diff,
          "graph", [whole[x]["graph_ms"] for x in ("torch_pool", "kernel_pool")], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    ap.add_argument("--kv-heads", default="4,28")
    markdown_args(ap, "pyramid_pool")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    payload = new_payload("pyramid_pool", f"python benchmarks/pyramid_pool.py --sizes {args.sizes} "
                          f"--kv-heads {args.kv_heads}", heads=H, d=D)
    cases = [(int(n), int(hk)) for hk in args.kv_heads.split(",") for n in args.sizes.split(",")]
    run_rows("pyramid_pool", payload, cases, lambda c, monitor: run_case(*c, monitor), write_markdown)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {p['heads']} heads, d = {p['d']}, "
             "batch 1, video-structured q/k (M-RoPE, 16×16 tokens per frame), random v, `pyramid` at its defaults.", "",
             "The pooled K/V the pyramid's kernels read (levels 2, 4 and 8, stacked): the torch step it used "
             "(`layout.pool_levels`: an fp32 copy of the keys, a mean per level, a `torch.cat`) against the one-pass "
             "kernel `attention.kernels.pool`, for k and v (GB/s: k and v read once and their levels written, over "
             "the kernel's time). The whole `sparse_attention` call with each step swapped in (the Gluon kernel), "
             "and dense cuDNN on the same inputs. Callables of a row run in 3 alternating rounds in one process; "
             "cells read ms (SM MHz). GPU ms: the call captured in a CUDA graph and replayed. Pooled equal: the "
             "kernel's pooled k equals the torch step's bit for bit; max abs diff between the two calls' outputs.",
             "", *([p["note"], ""] if p.get("note") else []),
             "| N | heads/KV | density | pool: torch ms | pool: kernel ms (GB/s) | pool speed-up | whole call, torch "
             "pool ms | whole call, kernel pool ms | whole speed-up | GPU ms (torch / kernel pool) | dense cuDNN ms | "
             "vs cuDNN | pooled equal, max abs diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        s, w = r["step"], r["whole"]
        lines.append(f"| {r['n']} | {r['heads']}/{r['kv_heads']} | {r['density']:.3f} | {ms_cell(s['torch'])} | "
                     f"{s['kernel']['ms']:.3f} ({s['kernel']['gb_s']:.0f}) | {r['step_speedup']:.1f}x | "
                     f"{ms_cell(w['torch_pool'])} | {ms_cell(w['kernel_pool'])} | {r['whole_speedup']:.2f}x | "
                     f"{gpu_cell(w['torch_pool'])} / {gpu_cell(w['kernel_pool'])} | {ms_cell(w['cudnn'])} | "
                     f"{r['vs_cudnn']:.2f}x | "
                     f"{'yes' if r['pooled_equal'] else 'no'}, {r['whole_max_abs_diff']:.1e} |")
    update_markdown(f"Pyramid: pooled K/V in one pass ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
