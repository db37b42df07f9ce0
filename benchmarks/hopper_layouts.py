"""The layouts the warp-specialised Gluon kernel took over from the Triton kernel on Hopper: ``pyramid``'s pooled
levels, ``pbs``'s permuted keys and a model's kept-key subsets (``models.hf.subset_attention``), each through both
kernels in the same process (``VIDSPARSE_ATTENTION_HOPPER`` 1 / 0, alternating rounds), with dense cuDNN on the same
inputs as the baseline.

    python benchmarks/hopper_layouts.py [--sizes 16384,32768,65536,131072] [--markdown-from FILE [--note TEXT]]

``pyramid`` and ``pbs`` run on video-structured q/k (``attention.video_qk``: M-RoPE over 16×16-token frames), where
they pick their layouts; each timed call is the whole ``sparse_attention`` (the K/V pooling, or the keys' gather by
the permutation, included). The subset rows keep a random sorted fraction of the keys. TF/s counts computed blocks
only (2·N²·D per head × density; a pooled block counts 1/p). Saves ``hopper_layouts.json`` under the device's
results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, causal_sdpa, flops, video_qk  # noqa: E402
from common import (  # noqa: E402
    interleaved, markdown_args, new_payload, rewrite_markdown, run_rows, update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import sparse_attention  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402

ROUND_MS = 200
H, HK, D = 28, 4, 128


def kernel(on: bool, fn):
    """``fn`` with the Gluon kernel allowed (``on``) or not: the switch is read at each call."""
    def run():
        os.environ["VIDSPARSE_ATTENTION_HOPPER"] = "1" if on else "0"
        return fn()
    return run


def compare(fns: dict, work: float, monitor) -> dict:
    """The callables (``triton``, ``gluon``, ``cudnn``) in alternating rounds; TF/s on ``work`` FLOPs for the sparse
    two, and the largest difference between their outputs."""
    diff = float((fns["gluon"]().float() - fns["triton"]().float()).abs().max())
    res = interleaved(fns, lambda fn: bench_ms(fn, rep_ms=ROUND_MS), 3, monitor)
    for name in ("triton", "gluon"):
        res[name]["tflops"] = work / res[name]["ms"] / 1e9
    res["max_abs_diff"] = diff
    res["speedup"] = res["triton"]["ms"] / res["gluon"]["ms"]
    res["vs_cudnn"] = res["cudnn"]["ms"] / res["gluon"]["ms"]
    return res


def run_size(n: int, monitor) -> dict:
    from vidsparse.models.hf import subset_attention

    row = {"n": n, "heads": H, "kv_heads": HK, "d": D, "cases": []}
    q, k, _, _ = video_qk(n // 256 - 1, 16, 16, H, HK, D)
    v = torch.randn_like(k)
    cudnn = causal_sdpa("cudnn", q, k.repeat_interleave(H // HK, 1), v.repeat_interleave(H // HK, 1))
    for spec in ("pyramid", "pyramid:exact=0.1,pool2=0.3,pool4=0.5,pool8=1", "pbs", "pbs:tau=0.5"):
        lay = PATTERNS.from_spec(spec).estimate(q, k, SeqMeta(128, 128, True))
        dens = lay.density()
        fns = {"triton": kernel(False, lambda: sparse_attention(q, k, v, lay)),
               "gluon": kernel(True, lambda: sparse_attention(q, k, v, lay)), "cudnn": cudnn}
        res = compare(fns, flops(H, n, D, dens), monitor)
        row["cases"].append({"case": f"`{spec}` (video q/k)", "density": dens, **res})
        print(n, spec, f"density {dens:.3f}", {x: round(res[x]["ms"], 3) for x in fns}, f"{res['speedup']:.2f}x",
              flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    qr = torch.randn(1, H, n, D, device="cuda", generator=g).bfloat16()
    kr, vr = (torch.randn(1, HK, n, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    cudnn = causal_sdpa("cudnn", qr, kr.repeat_interleave(H // HK, 1), vr.repeat_interleave(H // HK, 1))
    for frac in (0.5, 0.94):
        keys = torch.sort(torch.randperm(n, device="cuda", generator=g)[: int(n * frac)]).values
        fns = {"triton": kernel(False, lambda: subset_attention(qr, kr, vr, keys, backend="kernel")),
               "gluon": kernel(True, lambda: subset_attention(qr, kr, vr, keys, backend="kernel")), "cudnn": cudnn}
        res = compare(fns, flops(H, n, D, frac), monitor)  # each query sees about frac of the keys before it
        row["cases"].append({"case": f"key subset, {frac:.0%} of the keys (random q/k)", "density": frac, **res})
        print(n, "subset", frac, {x: round(res[x]["ms"], 3) for x in fns}, f"{res['speedup']:.2f}x", flush=True)
    os.environ.pop("VIDSPARSE_ATTENTION_HOPPER", None)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    markdown_args(ap, "hopper_layouts")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    payload = new_payload("hopper_layouts", "python benchmarks/hopper_layouts.py --sizes " + args.sizes, block=128)
    run_rows("hopper_layouts", payload, [int(n) for n in args.sizes.split(",")], run_size, write_markdown)


def cell(x: dict, tf: bool = True) -> str:
    mhz = f", {x['sm_mhz']:.0f} MHz" if "sm_mhz" in x else ""
    return f"{x['ms']:.2f} ({x['tflops']:.0f}{mhz})" if tf else f"{x['ms']:.2f}{' (' + mhz[2:] + ')' if mhz else ''}"


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {H} heads / {HK} K/V heads, d = {D}, "
             "batch 1, causal, 128×128 blocks.", "",
             "The layouts the Gluon kernel took over from the Triton kernel: `pyramid`'s pooled levels, `pbs`'s "
             "permuted keys (each the whole `sparse_attention` call, the K/V pooling or the gather of K/V by the "
             "permutation included) and a model's kept-key subsets (`models.hf.subset_attention`, the path of "
             "ZipVL-style key pruning, its own-key fold-in included). Both kernels, and dense cuDNN on the same "
             "inputs, are timed in 3 alternating rounds in one process; cells read ms (TF/s on computed blocks, SM "
             "MHz). A pyramid's density weighs a block pooled p to one as 1/p; a subset's is its kept fraction (each "
             "query sees about that share of the keys before it). The `pyramid` and `pbs` rows of the "
             "H200 sparse-attention table before the Gluon kernel took them over (0492e21) ran the Triton kernel.", "",
             *([p["note"], ""] if p.get("note") else []),
             "| N | case | density | Triton kernel | Gluon kernel | Gluon vs Triton | dense cuDNN ms | Gluon vs cuDNN "
             "| max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        for c in r["cases"]:
            lines.append(f"| {r['n']} | {c['case']} | {c['density']:.3f} | {cell(c['triton'])} | {cell(c['gluon'])} | "
                         f"{c['speedup']:.2f}x | {cell(c['cudnn'], False)} | {c['vs_cudnn']:.2f}x | "
                         f"{c['max_abs_diff']:.1e} |")
    update_markdown(f"Pyramid levels, permuted keys and key subsets on the Hopper kernel ({p['device']})",
                    "\n".join(lines))


if __name__ == "__main__":
    main()
