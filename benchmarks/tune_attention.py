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
    for n, hk, rho, bk in [(131072, 4, 0.1, 128), (32768, 4, 1.0, 128), (32768, 4, 1.0, 64), (131072, 4, 0.1, 64)]:
        h, d = 28, 128
        q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
        lay = BlockLayout.dense(n, n, 128, bk, device="cuda") if rho == 1.0 else random_layout(h, n, rho)
        if rho < 1 and bk != 128:  # the same 128x128 blocks, each split into 128x64 halves
            m = lay.block_mask().repeat_interleave(128 // bk, -1)
            lay = BlockLayout.from_block_mask(m, 128, bk, n, n)
        dens = lay.density()
        args = (q, k, v, lay.kv_index, lay.kv_count, 128, bk, True, None)
        ref = bs.block_sparse_attention(*args)
        variants = {"ptr_autotune": lambda: bs.block_sparse_attention(*args)}
        for ws in (False, True):
            for w in (8,):
                for st in (2, 3):
                    variants[f"tma_ws{int(ws)}_w{w}_s{st}"] = (
                        lambda ws=ws, w=w, st=st: bs.block_sparse_attention_tma(*args, warp_specialize=ws, num_warps=w,
                                                                                 num_stages=st))
        for name, fn in variants.items():
            try:
                out = fn()
                err = float((out.float() - ref.float()).abs().max())
                ms = bench_ms(fn, rep_ms=300)
                row = {"n": n, "kv_heads": hk, "block_k": bk, "density": dens, "variant": name, "ms": ms,
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
