"""One launch of each estimation/attention kernel worth profiling, for NVIDIA Nsight Compute (``ncu``), after a warm-up
(compilation and caches outside the profiled launch):

    ncu --set full -k regex:"_fwd|_antidiagonal_mass" --launch-skip 2 --launch-count 2 -o prof \
        python benchmarks/ncu_target.py [--n 16384] [--density 0.05] [--layout pattern|random] [--skip-mass]

(``--launch-skip 2`` passes over the warm-up launches; with ``--skip-mass`` there is one warm-up launch and one
profiled launch: ``-k regex:_fwd --launch-skip 1 --launch-count 1``.)

- the Gluon block-sparse kernel on the blocks ``block_topk`` picks on video-structured q/k (28/4 heads, d = 128), or
  with ``--layout random`` on the random layout of ``attention.py``'s kernel table (random q/k/v);
- xattention's fused antidiagonal kernel at stride 16 on random q/k.
Nothing is timed here: ncu reports the launch's stall reasons, memory throughput and occupancy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import random_layout, video_qk  # noqa: E402

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention.kernels.antidiagonal import antidiagonal_block_mass  # noqa: E402
from vidsparse.attention.kernels.block_sparse_hopper import block_sparse_attention_hopper  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--layout", choices=("pattern", "random"), default="pattern")
    ap.add_argument("--skip-mass", action="store_true", help="profile the attention kernel only")
    args = ap.parse_args()
    h, hk, d = 28, 4, 128
    if args.layout == "pattern":
        q, k, _, _ = video_qk(args.n // 256 - 1, 16, 16, h, hk, d)
        lay = PATTERNS.from_spec(f"block_topk:density={args.density}").estimate(q, k, SeqMeta())
    else:
        q = torch.randn(1, h, args.n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hk, args.n, d, device="cuda", dtype=torch.bfloat16)
        lay = random_layout(h, args.n, args.density)
    v = torch.randn_like(k)
    attn = lambda: block_sparse_attention_hopper(q, k, v, lay.kv_index, lay.kv_count, True, d ** -0.5)  # noqa: E731
    mass = lambda: antidiagonal_block_mass(q, k, args.stride, 128, 128, True)  # noqa: E731
    fns = (attn, ) if args.skip_mass else (attn, mass)
    for fn in fns:  # warm-up: compile, caches
        fn()
    torch.cuda.synchronize()
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    print(f"N={q.shape[2]} {args.layout} density={lay.density():.3f}: profiled {len(fns)} launch(es)", flush=True)


if __name__ == "__main__":
    main()
