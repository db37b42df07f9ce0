"""The block-wise torch path (``attention/blockwise.py``) against the fp32 oracle, and its chunking."""

import pytest
import torch
from tolerances import FP32_SAME_ATOL, FP32_SAME_RTOL, kernel_ok

from vidsparse.attention import BlockLayout
from vidsparse.attention.blockwise import _chunks, _unit_bytes, blockwise_attention, default_budget
from vidsparse.attention.layout import PermutedLayout, PyramidLayout
from vidsparse.attention.ops import sparse_attention
from vidsparse.attention.reference import layout_attention, masked_attention, pyramid_attention
from vidsparse.errors import InputError

BUDGETS = [1, 200_000, None]  # every unit alone, a few units per chunk, the default (all at once here)


def _inputs(b, h, hk, nq, nk, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=g).to(dtype), torch.randn(b, hk, nk, d, generator=g).to(dtype),
            torch.randn(b, hk, nk, d, generator=g).to(dtype), g)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", [
    # b, h, hk, nq, nk, block_q, block_k, causal
    (2, 4, 2, 300, 300, 32, 32, True),    # GQA, ragged end
    (1, 2, 1, 200, 333, 64, 32, True),    # Nq < Nk: bottom-right causal, unequal blocks
    (2, 4, 4, 257, 190, 32, 64, False),   # non-causal, Nq > Nk
    (1, 3, 1, 64, 64, 16, 16, True),      # three query heads on one K/V head
    (1, 2, 1, 136, 200, 32, 32, True),    # Nk − Nq a multiple of the block, both ragged
    (1, 2, 2, 150, 200, 32, 32, False),   # non-causal, a partial last key block
])
def test_matches_the_oracle(case, budget, monkeypatch):
    """Against the oracle, with every unit alone, a few per chunk, or all at once. Square blocks (with, when causal,
    keys ending a whole number of blocks after the queries) take the mask-free path, the others the masked one."""
    import vidsparse.attention.blockwise as bw

    b, h, hk, nq, nk, bq, bk, causal = case
    mask_free = []
    real = bw._run_mask_free
    monkeypatch.setattr(bw, "_run_mask_free", lambda *a: mask_free.append(a[9]) or real(*a))
    q, k, v, g = _inputs(b, h, hk, nq, nk, 32, seed=sum(case[:5]))
    mask = torch.rand(b, h, -(-nq // bq), -(-nk // bk), generator=g) > 0.5
    mask[:, 0, 1] = False  # a query block of head 0 that sees nothing: its rows are 0
    lay = BlockLayout.from_block_mask(mask, bq, bk, nq, nk, causal=causal)
    out = blockwise_attention(q, k, v, lay.kv_index, lay.kv_count, bq, bk, causal, max_bytes=budget)
    torch.testing.assert_close(out, layout_attention(q, k, v, lay), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    assert (out[:, 0, bq:2 * bq] == 0).all() and (out != 0).any(-1).float().mean() > 0.5
    fast = bq == bk and (not causal or (nk - nq) % bk == 0)
    assert bool(mask_free) == fast
    if fast:  # runs that share a mask at the edge block, and runs that need none
        assert set(mask_free) == ({True, False} if causal or nk % bk else {False})


@pytest.mark.parametrize("causal", [True, False])
def test_per_sequence_lengths(causal):
    """A padded batch: rows past a sequence's length are 0, keys past it unseen, causal aligned per sequence."""
    q, k, v, g = _inputs(3, 4, 2, 160, 160, 16, seed=4)
    lay = BlockLayout.from_block_mask(torch.rand(1, 4, 5, 5, generator=g) > 0.3, 32, 32, 160, 160, causal=causal)
    lq, lk = torch.tensor([160, 97, 33]), torch.tensor([160, 97, 70 if not causal else 33])
    want = layout_attention(q, k, v, lay, seqlens_q=lq, seqlens_k=lk)
    for budget in BUDGETS:
        out = blockwise_attention(q, k, v, lay.kv_index, lay.kv_count, 32, 32, causal, seqlens_q=lq, seqlens_k=lk,
                                  max_bytes=budget)
        torch.testing.assert_close(out, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
        assert (out[1, :, 97:] == 0).all() and (out[2, :, 33:] == 0).all()


def test_permuted_keys_mask_by_original_position():
    q, k, v, g = _inputs(2, 4, 2, 90, 90, 16, seed=3)
    perm = torch.stack([torch.stack([torch.randperm(90, generator=g) for _ in range(2)]) for _ in range(2)])
    lay = PermutedLayout(perm, BlockLayout.from_block_mask(torch.rand(2, 4, 6, 6, generator=g) > 0.3, 16, 16, 90, 90,
                                                           causal=False))
    want = masked_attention(q, k, v, lay.dense_mask(4))
    torch.testing.assert_close(sparse_attention(q, k, v, lay, backend="torch"), want, atol=FP32_SAME_ATOL,
                               rtol=FP32_SAME_RTOL)
    idx = perm[..., None].expand(-1, -1, -1, 16)
    blocks = lay.blocks
    out = blockwise_attention(q, torch.gather(k, 2, idx), torch.gather(v, 2, idx), blocks.kv_index, blocks.kv_count,
                              16, 16, True, key_pos=perm, max_bytes=1)
    torch.testing.assert_close(out, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


def _random_pyramid(g):
    """Random exact and pooled blocks over 300 tokens in blocks of 32 (pooled only where the whole block is visible
    to its query block; the diagonal exact)."""
    nb = 10
    m, n = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    poolable = ((n + 1) * 32 <= 300) & ((n + 1) * 32 - 1 <= m * 32)
    level = torch.randint(0, 4, (1, 4, nb, nb), generator=g)  # 0: skip, 1: pool2, 2: pool4, 3: pool8
    pooled_at = [(level == i) & poolable for i in (1, 2, 3)]
    exact = ~(pooled_at[0] | pooled_at[1] | pooled_at[2]) & (torch.rand(1, 4, nb, nb, generator=g) > 0.3)
    exact |= torch.eye(nb, dtype=torch.bool)  # the diagonal stays exact
    lay = PyramidLayout(BlockLayout.from_block_mask(exact, 32, 32, 300, 300),
                        tuple(BlockLayout.from_block_mask(pm, 32, 32, 300, 300) for pm in pooled_at))
    assert all(p.kv_count.sum() > 0 for p in lay.pooled)
    return lay


def test_pyramid_levels_match_the_oracle():
    q, k, v, g = _inputs(1, 4, 2, 300, 300, 32, seed=12)
    lay = _random_pyramid(g)
    want = pyramid_attention(q, k, v, lay)
    for budget in BUDGETS:
        with_budget = {} if budget is None else {"VIDSPARSE_TORCH_ATTENTION_MB": str(budget / 2**20)}
        with pytest.MonkeyPatch.context() as mp:
            for key, val in with_budget.items():
                mp.setenv(key, val)
            out = sparse_attention(q, k, v, lay, backend="torch")
        torch.testing.assert_close(out, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


def test_pyramid_with_bf16_inputs():
    """The pooled levels' ln p biases need an fp32 mask, so pyramid chunks of bf16 inputs run in fp32; the output
    comes back in bf16, within the kernels' tolerance."""
    q, k, v, g = _inputs(1, 4, 2, 300, 300, 32, seed=13, dtype=torch.bfloat16)
    lay = _random_pyramid(g)
    out = sparse_attention(q, k, v, lay, backend="torch")
    ref = pyramid_attention(q.float(), k.float(), v.float(), lay)
    same = pyramid_attention(q, k, v, lay, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    err, err_same = ((x.float() - ref).abs().max().item() for x in (out, same))
    assert kernel_ok(err, err_same, torch.bfloat16), (err, err_same)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_the_kernels_tolerance(dtype):
    """bf16/fp16 inputs run through SDPA in their dtype: held to the kernels' criterion against the fp32 oracle
    (``tolerances.kernel_ok``: twice the error of torch's masked attention in the same dtype, plus an atol)."""
    q, k, v, g = _inputs(1, 4, 2, 200, 200, 64, seed=5, dtype=dtype)
    lay = BlockLayout.from_block_mask(torch.rand(1, 4, 7, 7, generator=g) > 0.4, 32, 32, 200, 200)
    out = sparse_attention(q, k, v, lay, backend="torch")
    ref = layout_attention(q.float(), k.float(), v.float(), lay)
    same = layout_attention(q, k, v, lay, dtype=dtype)
    assert out.dtype == dtype
    err, err_same = ((x.float() - ref).abs().max().item() for x in (out, same))
    assert kernel_ok(err, err_same, dtype), (err, err_same)


def test_auto_on_the_cpu_takes_the_torch_path(monkeypatch):
    """No kernel on the CPU: "auto" runs ``blockwise_attention`` (not the dense oracle), whose result it returns."""
    import vidsparse.attention.blockwise as bw

    q, k, v, _ = _inputs(1, 2, 1, 96, 96, 16, seed=6)
    lay = BlockLayout.dense(96, 96, 32, 32)
    calls = []
    real = bw.blockwise_attention
    monkeypatch.setattr(bw, "blockwise_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = sparse_attention(q, k, v, lay)
    assert calls == [1]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    torch.testing.assert_close(out, sdpa, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


def test_chunks_stay_within_the_budget():
    g = torch.Generator().manual_seed(1)
    widths = torch.randint(0, 40, (500,), generator=g).tolist()
    extra = torch.randint(0, 300, (500,), generator=g).tolist()
    cost = lambda w, x: _unit_bytes(w * 64 + x, 64, 128)  # noqa: E731
    for budget in (1, cost(10, 0), cost(39, 299) * 7, 10**12):
        runs = list(_chunks(widths, extra, cost, budget))
        assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == 500  # cover, in order
        for s, e, w in runs:
            assert w == max(widths[s:e])
            assert e - s == 1 or (e - s) * cost(w, max(extra[s:e])) <= budget
            if e < 500:  # greedy: the next unit would have passed the budget
                assert (e + 1 - s) * cost(max(widths[s:e + 1]), max(extra[s:e + 1])) > budget
    assert len(list(_chunks(widths, extra, cost, 10**12))) == 1


def test_peak_memory_follows_the_budget_not_n_squared():
    """At N = 8192 with 8 heads the oracle's dense score matrix alone is 2 GiB (its peak grew 6.5 GiB on this
    machine); the block-wise path at 5% density and a 16 MiB chunk budget grew 24 MiB: its 16 MiB output and the
    chunks (47 MiB when every chunk ran masked). Bound: 64 MiB. (tracemalloc does not see torch's CPU allocator, so
    this reads the peak resident memory of a child process; importing a module inside the call would count too:
    ``torch.nn.attention.bias`` alone is 120 MiB, which is why the CPU path builds its causal mask itself.)"""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, torch
        from vidsparse.attention import BlockLayout
        from vidsparse.attention.blockwise import blockwise_attention
        n, h = 8192, 8
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, n, 64, generator=g) for _ in range(3))
        nb = n // 128
        keep = (torch.rand(1, h, nb, nb, generator=g) < 0.05) | torch.eye(nb, dtype=torch.bool)
        lay = BlockLayout.from_block_mask(keep, 128, 128, n, n)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = blockwise_attention(q, k, v, lay.kv_index, lay.kv_count, 128, 128, True, max_bytes=16 * 2**20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    assert grown_mib < 64, grown_mib


def test_budget_setting_errors():
    for bad in ("0", "-3", "lots"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VIDSPARSE_TORCH_ATTENTION_MB", bad)
            with pytest.raises(InputError, match="VIDSPARSE_TORCH_ATTENTION_MB"):
                default_budget()
    with pytest.raises(InputError, match="auto, kernel, torch, reference"):
        sparse_attention(*_inputs(1, 1, 1, 8, 8, 8, 0)[:3], BlockLayout.dense(8, 8, 8, 8), backend="blocks")
    from vidsparse.models.hf import attention_scope

    with pytest.raises(InputError, match="auto, kernel, torch, reference"):
        with attention_scope(None, backend="blocks"):  # checked before the model is touched
            pass
