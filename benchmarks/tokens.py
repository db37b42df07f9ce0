"""Token reducers against the vision tower they follow: each reducer on 64 frames × 729 tokens × 3,584 channels
(LLaVA-OneVision layout) and on the Qwen2.5-VL-7B tower's own output for 64 frames at 448×252 (32 temporal steps ×
9×16 merged tokens), beside the time of that tower (real architecture, random bf16 weights).

    python benchmarks/tokens.py [--device cuda|cpu] [--no-tower] [--keep 0.25]

Target (issue 3): on the H100 every reducer takes ≤ 5% of the tower's time on the same frames."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, save, today, update_markdown, versions  # noqa: E402

from vidsparse import TOKENS  # noqa: E402
from vidsparse.types import VisualTokens  # noqa: E402


def timed(fn, device, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2] * 1000


def qwen_tower(device, dtype):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                 fullatt_block_indexes=[7, 15, 23, 31])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, dtype=dtype)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-tower", action="store_true")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--markdown-from", default="", help="only rewrite BENCHMARKS.md from a saved results JSON")
    args = ap.parse_args()
    if args.markdown_from:
        import json

        write_markdown(json.loads(Path(args.markdown_from).read_text()))
        return
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"benchmark": "tokens", "date": today(), "device": device_name() if dev == "cuda" else device_name(),
           "torch_device": dev, "versions": versions("torch", "transformers", "vidsparse"), "keep": args.keep}
    frames = args.frames
    t_q, gh, gw = frames // 2, 252 // 14, 448 // 14
    qwen_feats = None
    if not args.no_tower:
        tower = qwen_tower(dev, dtype)
        pixels = torch.randn(t_q * gh * gw, 3 * 2 * 14 * 14, device=dev, dtype=dtype, generator=g)
        grid = torch.tensor([[t_q, gh, gw]], device=dev)

        def run_tower():
            with torch.inference_mode():
                out = tower(pixels, grid_thw=grid)
            return getattr(out, "pooler_output", out)

        qwen_feats = run_tower()
        res["tower_ms"] = timed(run_tower, dev, reps=3, warmup=1)
        res["tower_input"] = {"frames": frames, "size": [252, 448], "patches": int(pixels.shape[0]),
                              "merged_tokens": int(qwen_feats.shape[0])}
        print(f"Qwen2.5-VL-7B tower, {frames} frames 448x252: {res['tower_ms']:.1f} ms -> {tuple(qwen_feats.shape)}", flush=True)
        del tower
    layouts = {
        f"llava_ov_{frames}x729x3584": VisualTokens.from_grid(
            torch.randn(frames * 729, 3584, device=dev, dtype=dtype, generator=g), [(27, 27)] * frames,
            attention=torch.rand(frames * 729, device=dev, generator=g)),
        f"qwen25vl_{t_q}x{gh // 2}x{gw // 2}x3584": VisualTokens.from_grid(
            qwen_feats if qwen_feats is not None else torch.randn(t_q * 144, 3584, device=dev, dtype=dtype, generator=g),
            [(gh // 2, gw // 2)] * t_q),
    }
    res["reducers"] = {}
    for lname, vt in layouts.items():
        budget = max(1, int(len(vt) * args.keep))
        res["reducers"][lname] = {"tokens": len(vt), "budget": budget, "ms": {}}
        for name in TOKENS.names():
            red = TOKENS.from_spec(name)
            ms = timed(lambda: red.reduce(vt, budget), dev)
            res["reducers"][lname]["ms"][name] = ms
            ratio = f" ({100 * ms / res['tower_ms']:.2f}% of the tower)" if "tower_ms" in res else ""
            print(f"  {lname:24s} {name:13s} {ms:9.2f} ms{ratio}", flush=True)
    out = save(f"tokens_{dev}", res)
    print(f"wrote {out}")
    write_markdown(res)


def write_markdown(res):
    names = sorted(next(iter(res["reducers"].values()))["ms"])
    tower = res.get("tower_ms")
    head = (f"Device: {res['device']} ({res['torch_device']}) — {res['date']} — `python benchmarks/tokens.py` — keep "
            f"{res['keep']:.0%} of the tokens; median of 5.")
    if tower:
        ti = res["tower_input"]
        head += (f" Qwen2.5-VL-7B vision tower (random weights, SDPA) on the same {ti['frames']} frames at 448×252 "
                 f"({ti['patches']} patches → {ti['merged_tokens']} tokens): {tower:.1f} ms.")
    lines = [head, "", "| reducer | " + " | ".join(f"{k} ({v['tokens']} → {v['budget']}) ms" for k, v in res["reducers"].items())
             + (" | % of tower (Qwen grid) |" if tower else " |"), "|---|" + "---|" * (len(res["reducers"]) + (1 if tower else 0))]
    for n in names:
        row = [f"{v['ms'][n]:.2f}" for v in res["reducers"].values()]
        if tower:
            q = next(v for k, v in res["reducers"].items() if k.startswith("qwen"))["ms"][n]
            row.append(f"{100 * q / tower:.2f}%")
        lines.append(f"| `{n}` | " + " | ".join(row) + " |")
    update_markdown(f"Token reducers ({res['device']}, {res['torch_device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
