"""The Qwen2.5-VL-7B vision tower (real architecture, random bf16 weights) at 64, 256 and 768 frames of 448×252:
transformers' SDPA path (one attention call per window or frame pair, from a Python loop) vs vidsparse's packed path
(``models.hf.vision_scope``: one batched call per distinct segment length per layer), wall time and GPU kernel time;
then the whole 7B forward (tower + prefill to the first logits) on 768 frames, vanilla vs vidsparse.

    python benchmarks/vision.py [--frames 64,256,768] [--markdown-from JSON]

Target (issue 7): tower on 768 frames ≥ 3× faster than the SDPA path, outputs equal within the bf16 rule; whole
forward on 768 frames ≤ 4 s."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cuda_empty as _empty
from common import cuda_sync as _sync
from common import device_name, save, today, update_markdown, versions

Q = "What is written on the screen?"


def wall_ms(fn, reps=3):
    fn()
    _sync()
    out = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[len(out) // 2]


def gpu_ms(fn) -> float:
    """Sum of CUDA kernel time of one call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return float("nan")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    total = 0.0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            total += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return total / 1e3


def fp32_check(ad, tower, n: int, device: str) -> dict:
    """Max abs error to the fp32 tower (same weights) of: transformers' bf16 SDPA path (the baseline), the packed
    path and the packed + compiled path; the rule of tests/tolerances.py: err ≤ 2·err(baseline) + atol(bf16)."""
    import copy

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tolerances import kernel_ok

    from vidsparse.models.hf import vision_scope
    from vidsparse.types import Frames

    frames = Frames(np.random.default_rng(1).integers(0, 255, (n, 252, 448, 3), dtype=np.uint8), np.arange(n) * 0.5)
    pv, thw = ad.pixels(frames)
    grid = torch.tensor([thw], device=device)
    t32 = copy.deepcopy(tower).float()
    with torch.inference_mode():
        ref = t32(pv.float(), grid_thw=grid).pooler_output.float()
        del t32
        base = tower(pv.to(ad.dtype), grid_thw=grid).pooler_output.float()
        with vision_scope(tower):
            packed = tower(pv.to(ad.dtype), grid_thw=grid).pooler_output.float()
        with vision_scope(tower, compile_blocks=True):
            comp = tower(pv.to(ad.dtype), grid_thw=grid).pooler_output.float()
    e = {k: float((x - ref).abs().max()) for k, x in (("sdpa_bf16", base), ("packed", packed), ("compiled", comp))}
    return {"frames": n, "max_abs_err_vs_fp32": e,
            "packed_within_rule": kernel_ok(e["packed"], e["sdpa_bf16"], torch.bfloat16),
            "compiled_within_rule": kernel_ok(e["compiled"], e["sdpa_bf16"], torch.bfloat16)}


def markdown(p: dict) -> str:
    lines = [f"Device: {p['device']}, {p['date']}; `python benchmarks/vision.py`; Qwen2.5-VL-7B vision tower (32 "
             "layers, 4 with full attention per frame pair, the rest in 8×8-patch windows), random bf16 weights, "
             "frames of 448×252 (576 patches, 144 LLM tokens per frame pair). Wall = median of 3 after a warm-up; "
             "GPU = sum of CUDA kernel time of one run (torch.profiler).", "",
             "| frames | patches | SDPA path wall ms | SDPA path GPU ms | packed wall ms | packed GPU ms | speed-up (wall) "
             "| max abs diff | rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
    if any("compiled_wall_ms" in r for r in p["tower"]):
        lines[2] = lines[2].rstrip() + " packed + compiled wall ms | compiled speed-up | compiled rel. diff |"
        lines[3] = lines[3] + "---|---|---|"
    for r in p["tower"]:
        extra = (f" {r['compiled_wall_ms']:.0f} | **{r['sdpa_wall_ms'] / r['compiled_wall_ms']:.2f}×** | "
                 f"{r['compiled_rel_diff']:.3g} |") if "compiled_wall_ms" in r else ""
        lines.append(f"| {r['frames']} | {r['patches']:,} | {r['sdpa_wall_ms']:.0f} | {r['sdpa_gpu_ms']:.0f} | "
                     f"{r['packed_wall_ms']:.0f} | {r['packed_gpu_ms']:.0f} | **{r['sdpa_wall_ms'] / r['packed_wall_ms']:.2f}×** "
                     f"| {r['max_abs_diff']:.3g} | {r['rel_diff']:.3g} |" + extra)
    firsts = [r for r in p["tower"] if "compiled_first_call_ms" in r]
    if firsts:
        lines += ["", "Compilation: the first compiled call (" + f"{firsts[0]['frames']} frames) took "
                      f"{firsts[0]['compiled_first_call_ms'] / 1e3:.1f} s; later frame counts reused the graphs (first "
                      "calls " + ", ".join(f"{r['frames']} frames {r['compiled_first_call_ms']:.0f} ms"
                                            for r in firsts[1:]) + ")."]
    c = p.get("fp32_check")
    if c:
        e = c["max_abs_err_vs_fp32"]
        lines += ["", f"Against the fp32 tower on {c['frames']} frames (max abs error of the merged tokens): transformers' "
                      f"bf16 SDPA path {e['sdpa_bf16']:.3g}, packed {e['packed']:.3g}, packed + compiled "
                      f"{e['compiled']:.3g}; within the bf16 rule of tests/tolerances.py (≤ 2× the bf16 baseline's "
                      f"error + 0.016): packed {c['packed_within_rule']}, compiled {c['compiled_within_rule']}."]
    w = p.get("whole")
    if w:
        lines += ["", f"Whole 7B forward on {w['frames']} frames ({w['prompt_tokens']:,} prompt tokens; pixels "
                      f"prepared, to the first logits): transformers vanilla {w['vanilla_ms']:.0f} ms, vidsparse "
                      f"(packed tower + cuDNN-first dense prefill) {w['vidsparse_ms']:.0f} ms "
                      f"({w['vanilla_ms'] / w['vidsparse_ms']:.2f}×; tower {w['vidsparse_tower_ms']:.0f} ms, prefill "
                      f"{w['vidsparse_prefill_ms']:.0f} ms); first-token argmax equal: {w['same_argmax']}."]
        if "vidsparse_compiled_ms" in w:
            lines[-1] += (f" With the tower's blocks compiled (`torch.compile`, after a first compiling call): "
                          f"{w['vidsparse_compiled_ms']:.0f} ms ({w['vanilla_ms'] / w['vidsparse_compiled_ms']:.2f}×; "
                          f"tower {w['vidsparse_compiled_tower_ms']:.0f} ms, prefill "
                          f"{w['vidsparse_compiled_prefill_ms']:.0f} ms); argmax equal: {w['compiled_same_argmax']}.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", default="64,256,768")
    ap.add_argument("--no-whole", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also the packed path with torch.compile'd blocks")
    ap.add_argument("--fp32-check", type=int, default=0,
                    help="frames for a check against the fp32 tower with tests/tolerances.py's bf16 rule (0: skip)")
    ap.add_argument("--markdown-from", default="")
    ap.add_argument("--name", default="vision", help="results file name; BENCHMARKS.md is updated only for 'vision'")
    ap.add_argument("--size", default="7b", help="7b (the benchmark) or tiny (a smoke test of this script)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.markdown_from:
        update_markdown("Vision tower (issue 7)", markdown(json.loads(Path(args.markdown_from).read_text())))
        return
    from transformers import DynamicCache

    from vidsparse.models.hf import attention_scope, vision_scope
    from vidsparse.models.qwen2_5_vl import QwenVLAdapter
    from vidsparse.models.random import random_qwen2_5_vl
    from vidsparse.types import Frames

    model, tok = random_qwen2_5_vl(args.size, dtype="bfloat16" if args.device == "cuda" else "float32",
                                   device=args.device)
    ad = QwenVLAdapter(model, tok)
    tower = ad.vision_tower()
    rng = np.random.default_rng(0)
    payload = {"device": device_name(), "date": today(), "versions": versions("torch", "transformers", "triton"),
               "tower": []}
    if args.fp32_check:
        payload["fp32_check"] = fp32_check(ad, tower, args.fp32_check, args.device)
        print(json.dumps(payload["fp32_check"]), flush=True)
    for n in [int(x) for x in args.frames.split(",")]:
        frames = Frames(rng.integers(0, 255, (n, 252, 448, 3), dtype=np.uint8), np.arange(n) * 0.5)
        pv, (gt, gh, gw) = ad.pixels(frames)
        pv = pv.to(args.device, ad.dtype)
        grid = torch.tensor([[gt, gh, gw]], device=args.device)

        def slow():
            with torch.inference_mode():
                return tower(pv, grid_thw=grid).pooler_output

        def fast():
            with torch.inference_mode(), vision_scope(tower):
                return tower(pv, grid_thw=grid).pooler_output

        def fast_compiled():
            with torch.inference_mode(), vision_scope(tower, compile_blocks=True):
                return tower(pv, grid_thw=grid).pooler_output

        ref, got = slow(), fast()
        diff = (got.float() - ref.float()).abs()
        row = {"frames": n, "patches": int(pv.shape[0]), "sdpa_wall_ms": wall_ms(slow), "packed_wall_ms": wall_ms(fast),
               "sdpa_gpu_ms": gpu_ms(slow), "packed_gpu_ms": gpu_ms(fast), "max_abs_diff": float(diff.max()),
               "rel_diff": float(diff.norm() / ref.float().norm())}
        if args.compile:
            t0 = time.perf_counter()
            comp = fast_compiled()
            _sync()
            row["compiled_first_call_ms"] = (time.perf_counter() - t0) * 1e3
            cd = (comp.float() - ref.float()).abs()
            row.update(compiled_wall_ms=wall_ms(fast_compiled), compiled_gpu_ms=gpu_ms(fast_compiled),
                       compiled_max_abs_diff=float(cd.max()), compiled_rel_diff=float(cd.norm() / ref.float().norm()))
        payload["tower"].append(row)
        print(json.dumps(row), flush=True)
        del ref, got, pv
        _empty()

    if not args.no_whole:
        n = 768
        frames = Frames(rng.integers(0, 255, (n, 252, 448, 3), dtype=np.uint8), np.arange(n) * 0.5)
        ad.fast_tower = False
        enc = ad.encode_video(frames)
        inp = ad.full_inputs(enc, Q)
        inp.pop("_span")
        pv_whole, thw = enc.extra["pixel_values"], tuple(enc.extra["grid"][0].tolist())
        del enc

        def vanilla():
            with torch.inference_mode():
                return ad.model(**inp, logits_to_keep=1).logits[:, -1]

        times = {}

        def ours():
            _sync()
            t0 = time.perf_counter()
            ad.fast_tower = True
            ad.compile_tower = compile_now
            e = ad.encode_pixels(pv_whole, thw, frames.pts_s)
            _sync()
            t1 = time.perf_counter()
            p = ad.build_prompt(e, None, Q)
            with torch.inference_mode(), attention_scope(ad.language_model()):
                lg = ad.forward_logits(p.inputs_embeds, p.position_ids, DynamicCache(), embeds=True)
            _sync()
            times.update(tower=(t1 - t0) * 1e3, prefill=(time.perf_counter() - t1) * 1e3)
            return lg

        compile_now = False
        a = vanilla()
        b = ours()
        extra = {}
        if args.compile:
            compile_now = True
            c = ours()
            extra = {"vidsparse_compiled_ms": wall_ms(ours), "vidsparse_compiled_tower_ms": times["tower"],
                     "vidsparse_compiled_prefill_ms": times["prefill"],
                     "compiled_same_argmax": bool(a.argmax() == c.argmax())}
            compile_now = False
        payload["whole"] = {**extra, "frames": n, "prompt_tokens": int(inp["input_ids"].shape[1]),
                            "vanilla_ms": wall_ms(vanilla), "vidsparse_ms": wall_ms(ours),
                            "vidsparse_tower_ms": times["tower"], "vidsparse_prefill_ms": times["prefill"],
                            "same_argmax": bool(a.argmax() == b.argmax()),
                            "logit_rel_diff": float((a.float() - b.float()).norm() / a.float().norm())}
        print(json.dumps(payload["whole"]), flush=True)
    path = save(args.name, payload)
    print(f"saved {path}")
    if args.name == "vision":
        update_markdown("Vision tower (issue 7)", markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
