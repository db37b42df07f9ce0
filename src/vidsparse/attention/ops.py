"""``sparse_attention``: the public op. The Triton kernel on CUDA, the fp32-reference path elsewhere."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..errors import InputError
from .layout import BlockLayout


def kernel_available(q: Tensor) -> bool:
    """The kernel serves CUDA tensors. (CPU tensors run it only when asked, under TRITON_INTERPRET=1, in tests.)"""
    if not q.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_tma(q: Tensor, layout: BlockLayout) -> bool:
    """Hopper or newer, 128x128 blocks, head dim 64 or 128: the TMA variant (benchmarks/tune_attention.py measured
    it 5-7% faster than pointer loads on an H100). ``VIDSPARSE_ATTENTION_TMA=0`` turns it off."""
    if not q.is_cuda or os.environ.get("VIDSPARSE_ATTENTION_TMA", "1") == "0":
        return False
    return (torch.cuda.get_device_capability(q.device) >= (9, 0) and q.shape[-1] in (64, 128)
            and q.dtype in (torch.bfloat16, torch.float16)
            and layout.block_q == 128 and layout.block_k == 128)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, causal: bool | None = None,
                     scale: float | None = None, seqlens_q: Tensor | None = None, seqlens_k: Tensor | None = None,
                     backend: str = "auto") -> Tensor:
    """Attention computed only on ``layout``'s blocks.

    q [B, H, Nq, D]; k, v [B, Hkv, Nk, D] with Hkv dividing H (GQA, K/V never expanded); bf16, fp16 or fp32.
    ``seqlens_q``/``seqlens_k`` int [B]: per-sequence lengths of a padded batch (rows past them are 0).
    ``backend``: "auto" (kernel when available), "kernel", or "reference"."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError("q, k, v must be [B, H, N, D]")
    b, h, nq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d or h % k.shape[1]:
        raise InputError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (layout.q_len, layout.k_len) != (nq, k.shape[2]):
        raise InputError(f"layout is for {layout.q_len}x{layout.k_len}, inputs are {nq}x{k.shape[2]}")
    causal = layout.causal if causal is None else causal
    if causal != layout.causal:
        raise InputError("causal flag differs from the layout's")
    lay = layout.expand(b, h) if layout.kv_index.shape[:2] not in ((1, 1), (b, h), (1, h), (b, 1)) else layout
    if backend not in ("auto", "kernel", "reference"):
        raise InputError(f"unknown attention backend {backend!r}: auto, kernel or reference")
    use_kernel = backend == "kernel" or (backend == "auto" and kernel_available(q))
    if use_kernel:
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            from ..errors import UnsupportedError

            raise UnsupportedError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for testing)")
        from .kernels import block_sparse as bs

        args = (q, k, v, lay.kv_index, lay.kv_count, layout.block_q, layout.block_k, causal, scale, seqlens_q, seqlens_k)
        if use_tma(q, layout):
            return bs.block_sparse_attention_tma(*args)
        return bs.block_sparse_attention(*args)
    from .reference import layout_attention

    return layout_attention(q, k, v, layout, scale, seqlens_q, seqlens_k)
