"""Where the time goes: SDPA backends on the 7B prefill shape and the packed vision tower's top GPU kernels.

    python benchmarks/tune_vision.py

(a) causal attention at N = 55,296 (the vanilla 768-frame prompt), 28 query / 4 KV heads, d = 128, bf16, with the
inputs laid out as transformers hands them (a transpose of [B, N, H, D]): PyTorch's default SDPA order, vidsparse's
cuDNN-first priority, cuDNN alone on contiguous inputs; (b) the 15 most expensive CUDA kernels of one packed-tower run
on 256 frames. Saves ``results/<device>/tune_vision.json``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, save, today, versions


def ms(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[len(out) // 2]


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vidsparse.models.hf import _sdpa

    payload = {"device": device_name(), "date": today(), "versions": versions("torch", "transformers"), "sdpa": {}}
    n, h, hk, d = 55296, 28, 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, n, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, n, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    flops = 2 * n * n * d * h  # causal: half of 4·N²·D per head
    res = payload["sdpa"]

    def default_order():
        import os

        os.environ["VIDSPARSE_SDPA"] = "default"
        try:
            return _sdpa(q, k, v, None, True)
        finally:
            os.environ.pop("VIDSPARSE_SDPA")

    res["default_order_ms"] = ms(default_order)
    res["vidsparse_cudnn_first_ms"] = ms(lambda: _sdpa(q, k, v, None, True))
    kk, vv = k.repeat_interleave(h // hk, 1).contiguous(), v.repeat_interleave(h // hk, 1).contiguous()
    qc = q.contiguous()
    for name, be in (("cudnn_only_contiguous_ms", SDPBackend.CUDNN_ATTENTION),
                     ("flash_only_contiguous_ms", SDPBackend.FLASH_ATTENTION)):
        def run(be=be):
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(qc, kk, vv, is_causal=True)
        try:
            res[name] = ms(run)
        except RuntimeError as exc:
            res[name] = f"failed: {str(exc)[:120]}"

    def cudnn_transposed():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(h // hk, 1),
                                                                    v.repeat_interleave(h // hk, 1), is_causal=True)
    try:
        res["cudnn_only_transposed_ms"] = ms(cudnn_transposed)
    except RuntimeError as exc:
        res["cudnn_only_transposed_ms"] = f"failed: {str(exc)[:120]}"
    for key in list(res):
        if isinstance(res[key], float):
            res[key.replace("_ms", "_tflops")] = flops / res[key] / 1e9
    print(res, flush=True)
    del q, k, v, kk, vv, qc
    torch.cuda.empty_cache()

    from torch.profiler import ProfilerActivity, profile

    from vidsparse.models.hf import vision_scope
    from vidsparse.models.qwen2_5_vl import QwenVLAdapter
    from vidsparse.models.random import random_qwen2_5_vl
    from vidsparse.types import Frames

    model, tok = random_qwen2_5_vl("7b", dtype="bfloat16", device="cuda")
    ad = QwenVLAdapter(model, tok)
    tower = ad.vision_tower()
    frames = Frames(np.random.default_rng(0).integers(0, 255, (256, 252, 448, 3), dtype=np.uint8),
                    np.arange(256) * 0.5)
    pv, thw = ad.pixels(frames)
    pv = pv.to(torch.bfloat16)
    grid = torch.tensor([thw], device="cuda")

    def fast():
        with torch.inference_mode(), vision_scope(tower):
            return tower(pv, grid_thw=grid).pooler_output

    fast()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            r = rows.setdefault(e.name[:110], [0.0, 0])
            r[0] += e.device_time_total / 1e3
            r[1] += 1
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:15]
    payload["tower_top_kernels_256_frames"] = [{"kernel": k_, "ms": round(v_[0], 2), "calls": v_[1]} for k_, v_ in top]
    payload["tower_gpu_ms_256_frames"] = round(sum(v_[0] for v_ in rows.values()), 1)
    for row in payload["tower_top_kernels_256_frames"]:
        print(row, flush=True)
    print(save("tune_vision", payload))


if __name__ == "__main__":
    main()
