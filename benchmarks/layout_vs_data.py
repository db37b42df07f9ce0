"""Layout or data: is a kernel's time on ``block_topk``'s layouts different from its time on random layouts of the
same density because of the layout or because of the inputs it ran on? A 2 × 2 in one process: ``block_topk``'s
layout (picked on video-structured q/k) and ``random_layout`` of the same density, each run on the video-structured
q/k/v it was picked on and on random normal q/k/v of the same shapes, through vidsparse and FlexAttention.

    python benchmarks/layout_vs_data.py [--sizes 131072] [--kv-heads 4,28] [--density 0.2] [--rounds 4]
        [--markdown-from FILE [--note TEXT]]

The kernels table (``attention.py``) runs random layouts on random inputs and ``block_topk``'s layouts on
video-structured inputs, between other callables (dense baselines, cuDNN on rows as short), so its two kinds of row
differ in both and in what ran before them. Here the eight callables run in alternating rounds (``common.interleaved``,
clocks sampled). Saves ``layout_vs_data.json`` under the device's results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, random_layout, video_qk  # noqa: E402
from common import (  # noqa: E402
    interleaved, markdown_args, ms_cell, new_payload, rewrite_markdown, run_rows, update_markdown,
)

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import sparse_attention  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402

ROUND_MS = 300
H, D = 28, 128
LAYOUTS, DATA, KERNELS = ("block_topk", "random"), ("video", "randn"), ("vidsparse", "flex")


def run_case(n: int, hk: int, density: float, rounds: int, monitor) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    qv, kv, _, _ = video_qk(n // 256 - 1, 16, 16, H, hk, D)
    vv = torch.randn_like(kv)
    gen = torch.Generator(device="cuda").manual_seed(1)
    data = {"video": (qv, kv, vv), "randn": tuple(torch.randn(t.shape, device="cuda", generator=gen).to(t.dtype)
                                                  for t in (qv, kv, vv))}
    lays = {"block_topk": PATTERNS.from_spec(f"block_topk:density={density}").estimate(qv, kv, SeqMeta(128, 128)),
            "random": random_layout(H, n, density)}
    fns = {}
    for ln, lay in lays.items():
        bm = lay.to_flex_block_mask()
        for dn, (q, k, v) in data.items():
            fns[f"vidsparse/{ln}/{dn}"] = lambda q=q, k=k, v=v, lay=lay: sparse_attention(q, k, v, lay)
            fns[f"flex/{ln}/{dn}"] = lambda q=q, k=k, v=v, bm=bm: flex(q, k, v, block_mask=bm, enable_gqa=True)
    res = interleaved(fns, lambda fn: bench_ms(fn, rep_ms=ROUND_MS), rounds, monitor)
    row = {"n": n, "heads": H, "kv_heads": hk, "rounds": rounds,
           "density": {ln: lay.density() for ln, lay in lays.items()}, "times": res}
    print(n, f"{H}/{hk}", {x: round(r["ms"], 2) for x, r in res.items()}, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="131072")
    ap.add_argument("--kv-heads", default="4,28")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=4)
    markdown_args(ap, "layout_vs_data")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    payload = new_payload("layout_vs_data", f"python benchmarks/layout_vs_data.py --sizes {args.sizes} --kv-heads "
                          f"{args.kv_heads} --density {args.density} --rounds {args.rounds}", heads=H, d=D,
                          target_density=args.density)
    cases = [(int(n), int(hk)) for hk in args.kv_heads.split(",") for n in args.sizes.split(",")]
    run_rows("layout_vs_data", payload, cases,
             lambda c, monitor: run_case(*c, args.density, args.rounds, monitor), write_markdown)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {p['heads']} heads, d = {p['d']}, "
             "batch 1, causal.", "",
             f"`block_topk:density={p['target_density']}`'s layout (picked on video-structured q/k: M-RoPE, 16×16 "
             "tokens per frame) and `random_layout` of the same density, each on those video-structured q/k/v and on "
             "random normal q/k/v of the same shapes, through vidsparse and FlexAttention on the identical layout. "
             f"All eight callables of a row in alternating rounds ({p['rows'][0]['rounds'] if p['rows'] else '-'}) "
             "in one process; cells read ms (SM MHz, W).", "", *([p["note"], ""] if p.get("note") else []),
             "| N | heads/KV | kernel | " + " | ".join(f"{ln} layout, {dn} data" for ln in LAYOUTS for dn in DATA)
             + " | Flex / vidsparse, the four columns in order |", "|" + "---|" * 8]

    def cell(x):
        return ms_cell(x)[:-1] + f", {x['power_w']:.0f} W)" if "power_w" in x else ms_cell(x)

    for r in p["rows"]:
        t = r["times"]
        for kern in KERNELS:
            cells = [cell(t[f"{kern}/{ln}/{dn}"]) for ln in LAYOUTS for dn in DATA]
            ratio = ", ".join(f"{t[f'flex/{ln}/{dn}']['ms'] / t[f'vidsparse/{ln}/{dn}']['ms']:.3f}"
                              for ln in LAYOUTS for dn in DATA) if kern == "vidsparse" else ""
            lines.append(f"| {r['n']} | {r['heads']}/{r['kv_heads']} | {kern} | " + " | ".join(cells)
                         + f" | {ratio} |")
    update_markdown(f"Layout or data: block_topk's layouts against random ones ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
