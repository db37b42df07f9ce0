"""The block-wise torch path (backend "torch": what "auto" runs on GPUs the Triton kernel does not serve) on CUDA
(run on the accelerator machine: pytest -m gpu)."""

import pytest
import torch
from tolerances import KERNEL_ATOL, kernel_ok

from vidsparse import PATTERNS
from vidsparse.attention import BlockLayout, sparse_attention
from vidsparse.attention.blockwise import blockwise_attention
from vidsparse.attention.patterns import SeqMeta
from vidsparse.attention.reference import layout_attention, masked_attention, pyramid_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def qkv(b, h, hk, n, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    return mk(b, h, n, d), mk(b, hk, n, d), mk(b, hk, n, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,h,hk,n", [(128, 8, 2, 1537), (64, 4, 4, 1000)])
def test_torch_path_on_cuda_within_the_kernels_tolerance(dtype, d, h, hk, n):
    q, k, v = qkv(2, h, hk, n, d, dtype, seed=n)
    nb = -(-n // 128)
    mask = torch.rand(2, h, nb, nb, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) > 0.6
    mask[1, 0] = False  # a head that sees nothing: zeros, not NaN
    lay = BlockLayout.from_block_mask(mask, 128, 128, n, n)
    lens = {"seqlens_q": torch.tensor([n, n - 300], device="cuda"), "seqlens_k": torch.tensor([n, n - 300],
                                                                                               device="cuda")}
    for kw in ({}, lens):
        ref = layout_attention(q.float(), k.float(), v.float(), lay, **kw)
        same = layout_attention(q, k, v, lay, dtype=dtype, **kw)
        out = sparse_attention(q, k, v, lay, backend="torch", **kw)
        err, err_same = ((x.float() - ref).abs().max().item() for x in (out, same))
        assert kernel_ok(err, err_same, dtype), (err, err_same)
        assert not torch.isnan(out).any() and (out[1, 0] == 0).all()


@pytest.mark.parametrize("spec", ["pyramid:exact=0.2,pool2=0.3,pool4=0.4,pool8=0.5", "pbs:segment=128,tau=0.5"])
def test_pyramid_and_pbs_on_cuda(spec):
    q, k, v = qkv(1, 4, 2, 1100, 128, torch.bfloat16, seed=3)
    lay = PATTERNS.from_spec(spec).estimate(q, k, SeqMeta(128, 128))
    qf, kf, vf = q.float(), k.float(), v.float()
    if spec.startswith("pyramid"):
        ref, same = pyramid_attention(qf, kf, vf, lay), pyramid_attention(q, k, v, lay, dtype=torch.bfloat16)
    else:
        m = lay.dense_mask(4)
        ref, same = masked_attention(qf, kf, vf, m), masked_attention(q, k, v, m, dtype=torch.bfloat16)
    out = sparse_attention(q, k, v, lay, backend="torch")
    err, err_same = ((x.float() - ref).abs().max().item() for x in (out, same))
    assert kernel_ok(err, err_same, torch.bfloat16), (err, err_same)


def test_peak_memory_on_cuda_follows_the_budget():
    """16K tokens, 28 query / 4 K/V heads, 5% of causal blocks: the oracle's dense fp32 scores would be 28 GiB; the
    torch path with a 64 MiB chunk budget adds at most its 112 MiB output and twice the budget (SDPA's workspace, the
    gathered K/V of a chunk), and agrees with the kernel on the same layout."""
    n, h, hk, d = 16384, 28, 4, 128
    q, k, v = qkv(1, h, hk, n, d, torch.bfloat16)
    nb = n // 128
    g = torch.Generator(device="cuda").manual_seed(0)
    keep = (torch.rand(1, h, nb, nb, device="cuda", generator=g) < 0.05) | torch.eye(nb, dtype=torch.bool,
                                                                                     device="cuda")
    lay = BlockLayout.from_block_mask(keep, 128, 128, n, n)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = blockwise_attention(q, k, v, lay.kv_index, lay.kv_count, 128, 128, True, max_bytes=64 * 2**20)
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - base
    assert added <= out.numel() * 2 + 2 * 64 * 2**20, added / 2**20
    kern = sparse_attention(q, k, v, lay, backend="kernel")
    assert (out.float() - kern.float()).abs().max().item() <= 2 * KERNEL_ATOL[torch.bfloat16]  # each within one
