"""Kernel variants side by side on the GPU (pointer loads vs TMA, warp specialisation, warps/stages), same layouts.

    python benchmarks/tune_attention.py

Prints ms and effective TF/s per variant and checks each against the first variant's output."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, flops, random_layout  # noqa: E402
from common import device_name, save, today  # noqa: E402

from vidsparse.attention import BlockLayout  # noqa: E402
from vidsparse.attention.kernels import block_sparse as bs  # noqa: E402


def main():
    res = {"benchmark": "tune_attention", "date": today(), "device": device_name(), "rows": []}
    for n, hk, rho in [(32768, 4, 0.1), (131072, 4, 0.1), (32768, 4, 1.0)]:
        h, d = 28, 128
        q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        lay = BlockLayout.dense(n, n, device="cuda") if rho == 1.0 else random_layout(h, n, rho)
        dens = lay.density()
        args = (q, k, v, lay.kv_index, lay.kv_count, 128, 128, True, None)
        ref = bs.block_sparse_attention(*args)
        variants = {"ptr_autotune": lambda: bs.block_sparse_attention(*args)}
        for ws in (False, True):
            for w in (4, 8):
                for st in (2, 3, 4):
                    variants[f"tma_ws{int(ws)}_w{w}_s{st}"] = (
                        lambda ws=ws, w=w, st=st: bs.block_sparse_attention_tma(*args, warp_specialize=ws, num_warps=w,
                                                                                 num_stages=st))
        for name, fn in variants.items():
            try:
                out = fn()
                err = float((out.float() - ref.float()).abs().max())
                ms = bench_ms(fn, rep_ms=300)
                row = {"n": n, "kv_heads": hk, "density": dens, "variant": name, "ms": ms,
                       "tflops": flops(h, n, d, dens) / ms / 1e9, "max_diff": err}
            except Exception as exc:
                row = {"n": n, "variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            res["rows"].append(row)
            print(row, flush=True)
        del q, k, v, lay
        torch.cuda.empty_cache()
    save("tune_attention", res)


if __name__ == "__main__":
    main()
