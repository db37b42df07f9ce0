"""``kivi``'s fused decode attention (``attention.kernels.kivi_decode``) alone, per launch configuration, against
SDPA over the same cache in bf16 and against the torch path (dequantise the cache, then SDPA), for one decoder layer
of Qwen2.5-VL-7B's shape (28 query heads over 4 K/V heads, d = 128) and one decode token.

    python benchmarks/kivi_decode.py [--sizes 16384,65536,131072] [--bits 2,4] [--configs 264/4,528/4,1056/2]
        [--against FILE]

A configuration is PROGRAMS/WARPS: the first kernel's target program count (``VIDSPARSE_KIVI_PROGRAMS``) and its
warps (``VIDSPARSE_KIVI_WARPS``). Each call is timed as launched (``do_bench``) and as a CUDA-graph replay (GPU time
alone), twice, interleaved in one process; ``--against FILE`` also times another copy of the kernel module (an
earlier commit's, ``git show REV:src/vidsparse/attention/kernels/kivi_decode.py > FILE``) at its own defaults. The
error column is the largest absolute difference from fp32 attention over the dequantised cache. Keys carry
per-channel offsets (as real keys do), values are random normal. Saves ``kivi_decode.json`` under the device's
results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, graph_ms
from common import load_copy, markdown_args, new_payload, rewrite_markdown, save, update_markdown

H, HK, D = 28, 4, 128


def run_case(n: int, bits: int, configs: list[str], against: str = "") -> list[dict]:
    from vidsparse.attention.kernels.kivi_decode import kivi_decode_attention, kivi_decode_reference
    from vidsparse.registry import KV

    F = torch.nn.functional
    g = torch.Generator(device="cuda").manual_seed(0)
    k = (torch.randn(1, HK, n, D, device="cuda", generator=g) + torch.linspace(-4, 4, D, device="cuda")).bfloat16()
    v = torch.randn(1, HK, n, D, device="cuda", generator=g).bfloat16()
    cache = KV.from_spec(f"kivi:bits={bits}").make_cache()
    cache.update(k, v, 0)
    cache.set_fused("auto")
    cache.update(k[:, :, :1], v[:, :, :1], 0)  # a decode step: the update returns the window alone
    lay = cache.layers[0]
    q = torch.randn(1, H, 1, D, device="cuda", generator=g).bfloat16()
    kf, vf = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    fns = {"sdpa bf16": lambda: F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True),
           "torch dequantise + sdpa": lambda: kivi_decode_reference(q, lay)}
    for cfg in configs:
        programs, warps = cfg.split("/")

        def fused(programs=programs, warps=warps):
            os.environ["VIDSPARSE_KIVI_PROGRAMS"], os.environ["VIDSPARSE_KIVI_WARPS"] = programs, warps
            try:
                return kivi_decode_attention(q, lay)
            finally:
                del os.environ["VIDSPARSE_KIVI_PROGRAMS"], os.environ["VIDSPARSE_KIVI_WARPS"]
        fns[f"kivi_decode {cfg}"] = fused
    if against:
        before = load_copy(against, "vidsparse.attention.kernels.kivi_decode_before")
        fns[f"kivi_decode of {against}"] = lambda: before.kivi_decode_attention(q, lay)
    dk, dv = lay.dequantized()
    ref = F.scaled_dot_product_attention(q.float(), torch.cat([dk, lay.keys], 2).float(),
                                         torch.cat([dv, lay.values], 2).float(), enable_gqa=True)
    rows = []
    for rep in range(2):
        for name, fn in fns.items():
            err = (fn().float() - ref).abs().max().item()
            rows.append({"n": n, "bits": bits, "call": name, "rep": rep, "ms": bench_ms(fn, 200),
                         "gpu_ms": graph_ms(fn), "max_err": err})
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,65536,131072")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--configs", default="264/4,528/4,1056/2")
    ap.add_argument("--against", default="", help="another copy of kivi_decode.py, timed beside this tree's")
    markdown_args(ap, "kivi_decode")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    command = f"python benchmarks/kivi_decode.py --sizes {args.sizes} --bits {args.bits} --configs {args.configs}" + \
        (f" --against {args.against}" if args.against else "")
    payload = new_payload("kivi_decode", command, heads=H, kv_heads=HK, d=D)
    for n in (int(x) for x in args.sizes.split(",")):
        for bits in (int(x) for x in args.bits.split(",")):
            payload["rows"].extend(run_case(n, bits, args.configs.split(","), args.against))
            save("kivi_decode", payload)
    write_markdown(payload)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — one decode token, {p['heads']} query heads "
             f"over {p['kv_heads']} K/V heads, d = {p['d']}, bf16, batch 1; kivi's defaults (group 32, window 128).",
             "", "GPU µs: the call captured in a CUDA graph and replayed; launched µs: `do_bench` (host launch "
             "included); the second of two interleaved rounds. × SDPA: GPU time over SDPA's on the full-precision "
             "cache of the same length.", ""]
    if p.get("note"):
        lines += [p["note"], ""]
    lines += ["| N | bits | call | GPU µs | launched µs | × SDPA | max error |", "|---|---|---|---|---|---|---|"]
    last = [r for r in p["rows"] if r["rep"] == 1]
    for r in last:
        base = next(x for x in last if (x["n"], x["bits"], x["call"]) == (r["n"], r["bits"], "sdpa bf16"))
        lines.append(f"| {r['n']} | {r['bits']} | {r['call']} | {r['gpu_ms'] * 1e3:.1f} | {r['ms'] * 1e3:.1f} | "
                     f"{r['gpu_ms'] / base['gpu_ms']:.2f} | {r['max_err']:.2e} |")
    update_markdown(f"kivi decode attention ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
