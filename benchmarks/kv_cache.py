"""KV caches at decode time: what ``kivi``, ``vidkv`` and ``mustafar`` store and cost against transformers'
``DynamicCache``, per decoder layer of Qwen2.5-VL-7B's shape (28 query heads over 4 K/V heads, d = 128, bf16), after
a prefill of N tokens.

    python benchmarks/kv_cache.py [--sizes 16384,65536] [--specs "kivi,kivi+fused,kivi:bits=4,vidkv,mustafar"]
        [--steps 32] [--layers 4]

Per cache: the bytes it stores after the first decode step (and against the full cache's); the milliseconds of a
decode step per layer — the cache's ``update`` with one token plus attention of the 28 query heads: SDPA over what
the update returns (GQA inside SDPA, the default backends; "dynamic+expand": the full cache with K/V repeated per
query head before SDPA, what vidsparse's decode did until 2026-11-29), or for a spec ending in "+fused" the update
returning kivi's window alone and ``attention.kernels.kivi_decode`` reading the packed cache (what vidsparse's decode
does on the GPU) — timed with CUDA events over ``--steps`` steps on ``--layers`` layers, the full cache rerun in the
same process; and the attention error: the relative L2 distance of that step's attention output from the output over
the full-precision keys and values, at the last step. Keys are ``attention.video_qk``'s (video-structured, M-RoPE)
plus a per-channel offset (real keys carry a few large-offset channels, the reason KIVI quantises keys per channel),
values random normal. Saves ``kv_cache.json`` under the device's results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_args, new_payload, rewrite_markdown, save, update_markdown

H, HK, D = 28, 4, 128


def inputs(n: int, steps: int, device: str):
    """Keys and values of n + steps tokens for one layer ([1, HK, n + steps, D] bf16 each), and the step queries."""
    from attention import video_qk

    frames = max(1, (n + steps - 256) // 256 + 1)
    q, k = video_qk(frames, 16, 16, H, HK, D, device=device)[:2]
    k, q = k[:, :, : n + steps], q[:, :, n: n + steps]
    g = torch.Generator(device=device).manual_seed(7)
    offset = torch.zeros(D, device=device)
    offset[torch.randperm(D, generator=g, device=device)[:4]] = 8.0  # a few outlier channels
    k = (k.float() + offset).to(torch.bfloat16)
    v = torch.randn(k.shape, generator=g, device=device).to(torch.bfloat16)
    return q.to(torch.bfloat16).contiguous(), k.contiguous(), v


def make(spec: str):
    from transformers import DynamicCache

    from vidsparse.registry import KV

    if spec.startswith("dynamic"):
        return DynamicCache()
    return KV.from_spec(spec.removesuffix("+fused")).make_cache()


def run_cache(spec: str, q, k, v, n: int, steps: int, layers: int) -> dict:
    """Prefill ``layers`` layers with the first n tokens, then ``steps`` decode steps (update + SDPA per layer)."""
    import torch.nn.functional as F

    from vidsparse.kv.base import cache_nbytes

    from vidsparse.attention.kernels.kivi_decode import kivi_decode_attention
    from vidsparse.models.hf import expand_kv

    cache = make(spec)
    fused = spec.endswith("+fused")
    for layer in range(layers):
        cache.update(k[:, :, :n], v[:, :, :n], layer)
    if fused:
        cache.set_fused("auto")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times, out, stored = [], None, None
    for s in range(steps):
        start.record()
        for layer in range(layers):
            kk, vv = cache.update(k[:, :, n + s: n + s + 1], v[:, :, n + s: n + s + 1], layer)
            if fused:
                assert cache.layers[layer].fused_step
                out = kivi_decode_attention(q[:, :, s: s + 1], cache.layers[layer])
            elif spec == "dynamic+expand":  # K/V repeated per query head first (vidsparse's decode before 2026-11-29)
                out = F.scaled_dot_product_attention(q[:, :, s: s + 1], *expand_kv(q, kk, vv))
            else:
                out = F.scaled_dot_product_attention(q[:, :, s: s + 1], kk, vv, enable_gqa=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / layers)
        if stored is None:  # after the first step
            stored = cache_nbytes(cache) / layers
    keep = times[steps // 4:]  # the first steps warm the allocator and the kernels
    ref = F.scaled_dot_product_attention(q[:, :, steps - 1: steps].float(), k[:, :, : n + steps].float(),
                                         v[:, :, : n + steps].float(), enable_gqa=True)
    err = float((out.float() - ref).norm() / ref.norm())
    return {"spec": spec, "n": n, "stored_mb": stored / 2**20, "step_ms": sorted(keep)[len(keep) // 2],
            "rel_err": err}


def default_specs() -> list[str]:
    """dynamic+expand, then each registered KV method that needs no prefill queries (the benchmark has none), and
    its "+fused" run where its cache layer can go to ``kivi_decode``."""
    from vidsparse.registry import KV

    specs = ["dynamic+expand"]
    for name in KV.names():
        cls = KV.get(name)
        if cls.needs_queries is not False:
            continue
        specs.append(name)
        if getattr(getattr(cls, "layer", None), "fusable", False):
            specs.append(f"{name}+fused")
    return specs


def run_case(n: int, specs: list[str], steps: int, layers: int) -> list[dict]:
    q, k, v = inputs(n, steps, "cuda")
    rows = []
    for rep in range(2):  # the full cache first and again, interleaved with the others
        for spec in ["dynamic", *specs]:
            r = run_cache(spec, q, k, v, n, steps, layers)
            r["rep"] = rep
            rows.append(r)
            print(r, flush=True)
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,65536")
    ap.add_argument("--specs", default="", help="comma-separated; default: dynamic+expand and every registered KV "
                    "method that needs no prefill queries, at its defaults, plus NAME+fused where its layer fuses")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    markdown_args(ap, "kv_cache")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    args.specs = args.specs or ",".join(default_specs())
    command = (f"python benchmarks/kv_cache.py --sizes {args.sizes} --specs \"{args.specs}\" --steps {args.steps} "
               f"--layers {args.layers}")
    payload = new_payload("kv_cache", command, heads=H, kv_heads=HK, d=D, steps=args.steps, layers=args.layers)
    for n in (int(x) for x in args.sizes.split(",")):
        payload["rows"].extend(run_case(n, [s for s in args.specs.split(",") if s], args.steps, args.layers))
        save("kv_cache", payload)
    write_markdown(payload)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — per decoder layer of Qwen2.5-VL-7B's shape: "
             f"{p['heads']} query heads over {p['kv_heads']} K/V heads, d = {p['d']}, bf16, batch 1.", "",
             "Stored: the cache's bytes after the first decode step. Step: one decode step's `update` plus SDPA over "
             "what it returns (\"+fused\": the update returns kivi's window and `kivi_decode` reads the packed cache), "
             f"median of the last {p['steps'] - p['steps'] // 4} of {p['steps']} steps (CUDA events), the "
             "second of two interleaved runs, against the full `DynamicCache` of the same run. Error: the step's "
             "attention output against fp32 attention over the full-precision keys and values (relative L2).", ""]
    if p.get("note"):
        lines += [p["note"], ""]
    lines += ["| N | cache | stored MiB | × full | step ms | × full | rel. error |", "|---|---|---|---|---|---|---|"]
    last = [r for r in p["rows"] if r["rep"] == max(x["rep"] for x in p["rows"])]
    for r in last:
        base = next(x for x in last if x["n"] == r["n"] and x["spec"] == "dynamic")
        lines.append(f"| {r['n']} | `{r['spec']}` | {r['stored_mb']:.1f} | {r['stored_mb'] / base['stored_mb']:.3f} | "
                     f"{r['step_ms']:.3f} | {r['step_ms'] / base['step_ms']:.2f} | {r['rel_err']:.4f} |")
    update_markdown(f"KV caches at decode ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
