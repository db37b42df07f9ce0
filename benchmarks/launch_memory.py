"""Shared memory per program of each Triton kernel's default launch, built for several GPU generations on this
machine (Triton's own ptxas; no GPU needed), against each generation's limit: which defaults ``kernels/fit.py``
steps down from, and where.

    python benchmarks/launch_memory.py [--targets 75,80,86,90] [--markdown-from FILE]

The kernels are launched through their public wrappers by the stand-in driver of ``tests/builds.py`` with no limit,
so each records its first (default) launch. Saves ``launch_memory.json`` under this machine's results and writes a
BENCHMARKS.md section. ``tests/test_launch_fit.py`` checks what launches under each limit."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builds import LAUNCH, build  # noqa: E402
from common import device_name, save, today, update_markdown, versions  # noqa: E402

# shared memory a program may use, by compute capability (CUDA programming guide, "opt-in" per block)
LIMITS = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
NAMES = {75: "Turing (T4)", 80: "A100", 86: "GA10x (RTX 30xx, A10)", 89: "Ada (RTX 40xx, L4, L40S)", 90: "Hopper"}
CASES = ("attention_d128,attention_d64,pyramid_d128,antidiagonal_s8,antidiagonal_s16,antidiagonal_s32,scores,"
         "column_mass,select_blocks,select_mass,select_levels")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="75,80,86,90", help="compute capabilities (75 builds fp16: no bf16 there)")
    ap.add_argument("--markdown-from", default="", help="a saved launch_memory.json: rewrite its table only")
    args = ap.parse_args()
    if args.markdown_from:
        write_markdown(json.loads(Path(args.markdown_from).read_text()))
        return
    targets = [int(t) for t in args.targets.split(",")]
    got = {}
    with tempfile.TemporaryDirectory() as cache:
        for cap in targets:
            hopper = ",attention_d128_tma" if cap >= 90 else ""
            out = build(cache, LAUNCH, CASES + hopper, target=(cap, 1 << 30))
            got[cap] = json.loads(out.strip().splitlines()[-1])
            print(cap, got[cap], flush=True)
    res = {"benchmark": "launch_memory", "date": today(), "device": device_name(), **versions("triton"),
           "command": "python benchmarks/launch_memory.py --targets " + args.targets, "limits": LIMITS,
           "targets": {str(c): v for c, v in got.items()}}
    save("launch_memory", res)
    write_markdown(res)


def write_markdown(res: dict) -> None:
    """The BENCHMARKS.md section of one run's results."""
    targets = [int(c) for c in res["targets"]]
    got = {int(c): v for c, v in res["targets"].items()}
    limits = {int(c): v for c, v in res["limits"].items()}
    head = "| kernel, default launch | " + " | ".join(f"sm_{c} ({NAMES.get(c, '')}, {limits[c] // 1024} KB)"
                                                    for c in targets) + " |"
    lines = [f"Built on {res['device']} with Triton {res.get('triton', '?')}'s ptxas, {res['date']}: each kernel's "
             "default launch through its public wrapper (bf16; fp16 for sm_75), shared memory per program in KB "
             "(warps, stages); **bold**: over that GPU's limit, so `kernels/fit.py` steps down there (below sm_80 "
             "the kernels are not used). Case names: attention at head dim 128/64 (128 × 128 blocks), its pyramid "
             "levels, xattention's antidiagonal kernel at strides 8/16/32, the pooled-score product, the probe-row "
             "mass kernels, the three selection kernels at 1,024 key blocks. Pointer loads throughout (CPU "
             "tensors), so the sm_90 column is not the Hopper defaults' TMA path except in the last row.", "", head,
             "|---|" + "---|" * len(targets)]
    for case in CASES.split(",") + ["attention_d128_tma"]:
        cells = []
        for c in targets:
            launches = got[c].get(case)
            if launches is None:
                cells.append("-")
                continue
            parts = []
            for _, shared, warps, stages in launches:
                kb = f"{shared / 1024:.1f} ({warps}, {stages})"
                parts.append(f"**{kb}**" if shared > limits[c] else kb)
            cells.append(", ".join(parts))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{res['command']}`."]
    update_markdown("Kernel shared memory per GPU generation (built, not run)", "\n".join(lines))

if __name__ == "__main__":
    main()
