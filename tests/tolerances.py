"""Every fidelity threshold of the test suite, in one place (DESIGN rule 3).

Kernels: ``err(kernel) <= KERNEL_ERR_FACTOR * err(torch, same dtype) + KERNEL_ATOL[dtype]``, where err is the max
absolute difference to the fp32 reference on the same inputs and torch computes the same masked attention in the
kernel's dtype."""

import torch

KERNEL_ERR_FACTOR = 2.0
KERNEL_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# Two fp32 computations of the same attention in different orders (gathered vs masked, permuted vs original keys,
# pooled keys vs their repeated originals): elementwise agreement.
FP32_SAME_ATOL = 2e-5
FP32_SAME_RTOL = 2e-5


# A kernel's per-row log-sum-exp (fp32 accumulation of bf16/fp16 products, hardware exp2/log2) against torch's fp32
# logsumexp over the same inputs (``causal_lse``); rows hold up to a few thousand keys, values up to about 30.
LSE_ATOL = 1e-4


def causal_lse(q, k):
    """The reference of LSE_ATOL: torch's fp32 log-sum-exp of each causal row, q [H, N, D], k [Hk, N, D] (GQA)."""
    n, d = q.shape[-2], q.shape[-1]
    s = (q.float() @ k.float().repeat_interleave(q.shape[0] // k.shape[0], 0).transpose(-1, -2)) / d ** 0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.logsumexp(s, -1)


def kernel_ok(err_kernel: float, err_torch: float, dtype) -> bool:
    return err_kernel <= KERNEL_ERR_FACTOR * err_torch + KERNEL_ATOL[dtype]

# Model integration (fp32 tiny models on the CPU): the fp32 reference attention vs torch SDPA through a whole forward.
MODEL_FP32_ATOL = 2e-4
MODEL_FP32_RTOL = 2e-4

# static_patches: a skipped temporal patch reuses the previous patch's tokens; with pixel noise of ±2 intensity levels
# (below tau) the reused tokens keep at least this cosine to the real encoding (tiny random tower, fp32).
STATIC_REUSE_COS = 0.999  # tests/test_models.py::test_static_patches_reuse_fidelity_under_noise

# A one-pass kernel whose fp32 result is rounded once to a bf16/fp16 output, against the fp32 oracle of the same
# expression: |got − want| ≤ eps(dtype)·|want| + ROUNDED_ATOL (round-to-nearest gives half that; the rest covers the
# fp32 sums' order).
ROUNDED_ATOL = 1e-6


def within_one_rounding(got, want, dtype) -> bool:
    return bool(torch.all((got.float() - want.float()).abs() <= torch.finfo(dtype).eps * want.float().abs()
                          + ROUNDED_ATOL))
