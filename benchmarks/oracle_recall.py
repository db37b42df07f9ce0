"""How close ``block_topk``'s pooled estimate comes to the best layout of the same size, on video-structured q/k.

    python benchmarks/oracle_recall.py [--frames 128] [--densities 0.05,0.1] [--rows 128] [--pool-strides 16,32]
                                       [--device cpu]

The oracle keeps, for each sampled query row, its own most massive key blocks (exact softmax over all causal keys,
summed per 128-token block), as many as ``block_topk`` keeps for that row's query block (ceil(density × causal
blocks), at least 2): an upper bound on any per-query-block selection of that count. Beside it, the attention-mass
recall (``attention.recall``) of ``block_topk`` at its default pooling (``base.POOL_SAMPLES`` tokens of each block,
8 since 2026-11-29, 16 before) and with exact block means (``pool_stride=1``), and with each of ``--pool-strides``
(8: 16 tokens of each 128-token block, 16: 8, 32: 4).
Runs on the CPU in about a minute at 128 frames (33K tokens). Saves
``oracle_recall.json`` and updates its BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import recall, video_qk  # noqa: E402
from common import new_payload, save, update_markdown  # noqa: E402

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402
from vidsparse.attention.patterns.base import POOL_SAMPLES as SAMPLES  # noqa: E402


def oracle(q, k, rows, density: float, block: int = 128) -> float:
    """Mean over heads and sampled rows of the mass of each row's ceil(density × causal blocks) (≥ 2) most massive
    key blocks."""
    n, d = q.shape[2], q.shape[3]
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1).float()
    s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows].float(), kk) / math.sqrt(d)
    p = torch.softmax(s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows[:, None], float("-inf")), -1)
    nb = -(-n // block)
    mass = torch.nn.functional.pad(p, (0, nb * block - n)).unflatten(-1, (nb, block)).sum(-1)
    count = torch.ceil((rows // block + 1).double() * density).long().clamp(min=2)
    top = mass.sort(-1, descending=True).values.cumsum(-1)
    return float(top.gather(-1, (count - 1).view(1, 1, -1, 1).expand(*top.shape[:3], 1)).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--densities", default="0.05,0.1")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--pool-strides", default="", help="more block_topk pool strides to compare, e.g. 16,32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    strides = [int(x) for x in args.pool_strides.split(",") if x]
    q, k, text, tpf = video_qk(args.frames, 16, 16, 28, 4, 128, device=args.device)
    n = q.shape[2]
    meta = SeqMeta(128, 128, True, visual=(text, n), tokens_per_frame=tpf, frame_hw=(16, 16))
    rows = torch.linspace(n // 8, n - 1, args.rows, device=args.device).long()
    payload = new_payload("oracle_recall", "python benchmarks/oracle_recall.py " + " ".join(sys.argv[1:]), n=n,
                          heads=28, kv_heads=4, sampled_rows=args.rows)
    for dens in (float(x) for x in args.densities.split(",")):
        row = {"density": dens, "oracle": oracle(q, k, rows, dens)}
        for name, spec in (("default", f"block_topk:density={dens}"),
                           ("exact_means", f"block_topk:density={dens},pool_stride=1"),
                           *((f"pool_stride_{p}", f"block_topk:density={dens},pool_stride={p}") for p in strides)):
            lay = PATTERNS.from_spec(spec).estimate(q, k, meta)
            row[name] = recall(q, k, lay, rows)
            row[name + "_density"] = float(lay.density())
        payload["rows"].append(row)
        print(row, flush=True)
    path = save("oracle_recall", payload)
    lines = [f"{payload['date']}, {payload['device']}: `{payload['command']}` (N = {n}, 28 heads / 4 KV heads, "
             f"{args.rows} sampled query rows from N/8 to the end). The oracle keeps each row's own most massive "
             "key blocks, as many as block_topk keeps for its query block: an upper bound at that count.", "",
             f"| density | oracle | block_topk (default: {SAMPLES} tokens a block) | block_topk, exact means |"
             + "".join(f" pool_stride={p} |" for p in strides),
             "|---|---|---|---|" + "---|" * len(strides)]
    lines += [f"| {r['density']} | {r['oracle']:.4f} | {r['default']:.4f} | {r['exact_means']:.4f} |"
              + "".join(f" {r[f'pool_stride_{p}']:.4f} |" for p in strides) for r in payload["rows"]]
    update_markdown(f"block_topk against a per-row oracle, video q/k ({payload['device']})", "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
