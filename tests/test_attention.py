"""Attention layer on the CPU: layouts, the reference, every pattern, and the Triton kernel in interpreter mode."""

import os
import re

import pytest
import torch

from tolerances import FP32_SAME_ATOL, FP32_SAME_RTOL, LSE_ATOL, causal_lse, kernel_ok, within_one_rounding
from vidsparse import PATTERNS
from vidsparse.attention import BlockLayout, sparse_attention
from vidsparse.attention.layout import causal_block_mask
from vidsparse.attention.patterns import SeqMeta
from vidsparse.attention.patterns.base import keep_top_mass, keep_topk, pool_blocks
from vidsparse.attention.reference import layout_attention, masked_attention


def qkv(b=1, h=4, hk=2, n=200, d=32, dtype=torch.float32, seed=0, nk=None):
    g = torch.Generator().manual_seed(seed)
    nk = nk or n
    return (torch.randn(b, h, n, d, generator=g).to(dtype), torch.randn(b, hk, nk, d, generator=g).to(dtype),
            torch.randn(b, hk, nk, d, generator=g).to(dtype))


def test_causal_block_mask_matches_elements():
    for nq, nk, bq, bk in [(100, 100, 32, 32), (70, 130, 16, 32), (64, 64, 64, 16)]:
        m = causal_block_mask(-(-nq // bq), -(-nk // bk), bq, bk, nq, nk)
        el = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        pooled = torch.nn.functional.pad(el, (0, (-nk) % bk, 0, (-nq) % bq)).view(-1, bq, m.shape[1], bk).any(3).any(1)
        assert torch.equal(m, pooled)


def test_layout_roundtrip_and_density():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 3, 7, 7, generator=g) > 0.5
    lay = BlockLayout.from_block_mask(mask, 16, 16, 100, 100)
    expect = mask & causal_block_mask(7, 7, 16, 16, 100, 100)
    assert torch.equal(lay.block_mask(), expect)
    for b in range(2):
        for h in range(3):
            for m in range(7):
                c = int(lay.kv_count[b, h, m])
                idx = lay.kv_index[b, h, m, :c].tolist()
                assert idx == sorted(idx) and idx == torch.nonzero(expect[b, h, m]).flatten().tolist()
    assert lay.density() == pytest.approx(expect.sum().item() / (6 * 28))
    dense = BlockLayout.dense(100, 100, 16, 16)
    assert dense.density() == 1.0
    el = dense.dense_mask()[0, 0]
    assert torch.equal(el, torch.tril(torch.ones(100, 100, dtype=torch.bool)))


def test_full_flags():
    lay = BlockLayout.dense(100, 100, 32, 32)
    # Full: strictly below the diagonal and not in the ragged last block.
    for m in range(4):
        for j in range(int(lay.kv_count[0, 0, m])):
            n = int(lay.kv_index[0, 0, m, j])
            assert bool(lay.kv_full[0, 0, m, j]) == (n < m and m < 3)


def test_flex_block_mask_has_the_same_blocks():
    mask = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    lay = BlockLayout.from_block_mask(mask, 32, 32, 128, 128)
    bm = lay.to_flex_block_mask()
    dense = bm.to_dense().bool()
    assert torch.equal(dense[..., :4, :4], lay.block_mask())


def test_reference_dense_equals_sdpa():
    q, k, v = qkv()
    ref = masked_attention(q, k, v, torch.tril(torch.ones(200, 200, dtype=torch.bool)))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    assert torch.allclose(ref, sdpa, atol=1e-5)


def test_dense_pattern_through_reference_equals_sdpa():
    q, k, v = qkv()
    lay = PATTERNS.from_spec("dense").estimate(q, k, SeqMeta(32, 32))
    out = sparse_attention(q, k, v, lay, backend="reference")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    assert torch.allclose(out, sdpa, atol=1e-5)


def test_empty_rows_give_zero():
    q, k, v = qkv(n=64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[1] = False
    lay = BlockLayout.from_block_mask(mask, 32, 32, 64, 64)
    out = sparse_attention(q, k, v, lay, backend="reference")
    assert torch.all(out[:, :, 32:] == 0) and torch.all(out[:, :, :32] != 0)


# --- patterns -----------------------------------------------------------------------------------------------------

META = SeqMeta(32, 32, True, visual=(0, 400), tokens_per_frame=50)
SPECS = ["dense", "sink_window", "power", "radial", "block_topk", "block_cdf", "xattention",
         "vertical_slash:vertical=40,slash=60"]


TOKEN_SPECS = ["token_sparse", "grid", "pyramid", "pbs"]  # Token/Group/Pyramid/Permuted layouts, tested below


def test_every_pattern_is_tested():
    assert sorted(s.split(":")[0] for s in SPECS + TOKEN_SPECS) == PATTERNS.names()


@pytest.mark.parametrize("backend", ["reference", "torch", "kernel"])
@pytest.mark.parametrize("coverage", [1.0, 0.8, 0.4])
def test_token_sparse_layout_and_execution(coverage, backend):
    from vidsparse.attention.layout import TokenLayout
    from vidsparse.attention.reference import masked_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 300, 64, generator=g) for h in (4, 2, 2))
    p = PATTERNS.from_spec(f"token_sparse:coverage={coverage},window=32,sink=4")
    lay = p.estimate(q, k, SeqMeta(visual=(10, 280)))
    assert isinstance(lay, TokenLayout)
    kept = lay.kept_mask()[0]
    assert kept[:, :10].all() and kept[:, 280:].all()  # text (and the window inside it) always kept
    for hh in range(4):  # each head's kept positions ascending, then -1 (the estimate keeps all N columns)
        c = int(lay.count[0, hh])
        assert c == int(kept[hh].sum()) and lay.index.shape[-1] == 300
        assert torch.equal(lay.index[0, hh, :c], kept[hh].nonzero()[:, 0]) and (lay.index[0, hh, c:] == -1).all()
    sc = p.scores(q, k)[0]
    dropped_mass = (sc * ~kept).sum(-1)
    assert (dropped_mass <= (1 - coverage) + 1e-5).all()
    if coverage == 1.0:
        assert kept.all()
    else:
        assert (lay.count < 300).all()
        # the drop is maximal: dropping the least attended kept droppable token too would exceed the budget
        droppable = torch.zeros(300, dtype=torch.bool)
        droppable[10:268] = True  # not sink or text (< 10, >= 280), not the last 32 (window)
        nxt = torch.where(kept & droppable, sc, torch.full_like(sc, float("inf"))).min(-1).values
        assert (dropped_mass + nxt > (1 - coverage) - 1e-6).all()
        assert lay.density() < 1.0
    ref = masked_attention(q, k, v, lay.dense_mask()) * lay.kept_mask()[..., None]
    out = sparse_attention(q, k, v, lay, backend=backend)
    torch.testing.assert_close(out, ref, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    if coverage == 1.0:
        dense = masked_attention(q, k, v, torch.ones(300, 300, dtype=torch.bool).tril())
        torch.testing.assert_close(out, dense, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


@pytest.mark.parametrize("spec", SPECS)
def test_pattern_contract(spec):
    q, k, v = qkv(n=400)
    lay = PATTERNS.from_spec(spec).estimate(q, k, META)
    bm = lay.expand(1, 4).block_mask()
    nb = 13
    allowed = causal_block_mask(nb, nb, 32, 32, 400, 400)
    assert not (bm & ~allowed).any()  # never beyond the causal triangle
    diag = torch.eye(nb, dtype=torch.bool)
    assert bm[..., diag].all()  # the diagonal is always computed
    assert bm[..., :, 0].all()  # so is the sink block
    again = PATTERNS.from_spec(spec).estimate(q, k, META)
    assert torch.equal(again.expand(1, 4).block_mask(), bm)  # deterministic


def test_block_topk_keeps_exactly_k_plus_forced():
    q, k, _ = qkv(n=512)
    lay = PATTERNS.from_spec("block_topk:topk=3,sink=0,local=0").estimate(q, k, SeqMeta(32, 32))
    allowed = causal_block_mask(16, 16, 32, 32, 512, 512).sum(-1)
    assert torch.equal(lay.kv_count[0, 0], torch.clamp(allowed, max=3).int())


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_block_topk_keeps_forced_then_best_scores(density):
    """Each row: its sink and diagonal blocks, then the highest pooled scores, ceil(density x causal blocks) in all."""
    import math

    from vidsparse.attention.patterns.base import block_scores

    q, k, _ = qkv(n=700, seed=12)
    meta = SeqMeta(32, 32)
    lay = PATTERNS.from_spec(f"block_topk:density={density},sink=1,local=1").estimate(q, k, meta)
    bm = lay.expand(1, 4).block_mask()[0]
    s = block_scores(q, k, meta, stride=0)[0]  # the default: 8 tokens of each block
    for h in range(4):
        for m in range(22):
            allowed = m + 1
            want = {0, m}
            others = [j for j in torch.argsort(s[h, m, :allowed], descending=True).tolist() if j not in want]
            want |= set(others[: max(0, math.ceil(allowed * density) - len(want))])
            assert set(torch.nonzero(bm[h, m]).flatten().tolist()) == want, (h, m)


@pytest.mark.parametrize("nq,nk,bq,bk", [(700, 700, 32, 32), (300, 900, 32, 64), (900, 300, 64, 32), (1, 1, 128, 128),
                                         (129, 1000, 128, 128)])
def test_causal_block_count_is_the_mask_sum(nq, nk, bq, bk):
    from vidsparse.attention.layout import causal_block_count

    nqb, nkb = -(-nq // bq), -(-nk // bk)
    assert causal_block_count(nqb, nkb, bq, bk, nq, nk) == int(causal_block_mask(nqb, nkb, bq, bk, nq, nk).sum())


@pytest.mark.parametrize("spec", ["block_topk:density=0.2", "pyramid", "pbs", "token_sparse", "grid"])
def test_density_tensor_equals_density(spec):
    """The model scope sums density_tensor() per layer (no host sync); it must be density() exactly."""
    q, k, _ = qkv(n=640, seed=4)
    meta = SeqMeta(32, 32, True, visual=(64, 576), tokens_per_frame=64)
    lay = PATTERNS.from_spec(spec).estimate(q, k, meta)
    assert float(lay.density_tensor()) == pytest.approx(lay.density(), rel=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_group_density_counts_only_existing_groups(causal):
    """GroupLayout.density_tensor sums over every possible group id (no host sync for the id count); per head:
    groups of sizes 3, 0 (id 1 unused), 5 with a 10-token prefix and 4 dense rows after the span. It is the dense
    mask's share of the full (causal) attention, exactly: causally counted in squared lengths, a row that sees j keys
    as 2j − 1 (rows seeing 1 … N keys sum to N²)."""
    from vidsparse.attention.layout import GroupLayout

    group = torch.tensor([[[0, 0, 0, 2, 2, 2, 2, 2], [0] * 8]])  # head 0: ids 0 and 2; head 1: one group
    lay = GroupLayout(group, (10, 18), 22, 22, causal)
    if causal:
        head0 = (3 ** 2 + 2 * 10 * 3 + 5 ** 2 + 2 * 10 * 5 + 10 ** 2 + 22 ** 2 - 18 ** 2) / 22 ** 2
        head1 = (8 ** 2 + 2 * 10 * 8 + 10 ** 2 + 22 ** 2 - 18 ** 2) / 22 ** 2
    else:
        head0 = (3 * 13 + 5 * 15 + 14 * 22) / 22 ** 2
        head1 = (8 * 18 + 14 * 22) / 22 ** 2
    assert float(lay.density_tensor()) == pytest.approx((head0 + head1) / 2, rel=1e-6)
    mask = lay.dense_mask()
    kept = (2 * mask.sum(-1) - 1).sum(-1) if causal else mask.sum((-2, -1))
    assert torch.equal(kept[0], torch.tensor([round(head0 * 22 ** 2), round(head1 * 22 ** 2)]))


def test_keep_top_mass_is_minimal():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert keep_top_mass(p, 0.8).tolist() == [[True, True, False, False]]
    assert keep_top_mass(p, 0.81).tolist() == [[True, True, True, False]]
    assert keep_topk(p, 2).tolist() == [[True, True, False, False]]
    z = torch.tensor([[0.0, 0.7, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert keep_topk(z, 3).tolist() == [[False, True, False, False], [False, True, True, True]]  # only positives
    assert keep_topk(z, 9).tolist() == (z > 0).tolist() and not keep_topk(z, 0).any()
    assert keep_topk(z, torch.tensor([3, 2])).tolist() == [[False, True, False, False], [False, False, True, True]]


def test_block_cdf_recall_grows_with_tau():
    q, k, _ = qkv(n=512, seed=3)
    q = q * 3  # peakier attention
    dens = [PATTERNS.from_spec(f"block_cdf:tau={t}").estimate(q, k, SeqMeta(32, 32)).density() for t in (0.5, 0.8, 0.99)]
    assert dens[0] <= dens[1] <= dens[2]


def test_pool_blocks_partial_last_block():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    assert pool_blocks(x, 4).flatten().tolist() == [1.5, 5.5, 8.5]


def test_pool_blocks_stride_takes_every_strided_token():
    """pool stride s averages the tokens at offsets 0, s, 2s, ... of each block (and of the partial last block):
    exact values on integers, a stride that does not divide the block or exceeds it included; auto (0) means 8
    tokens of each block (16 where a caller asks for 16)."""
    from vidsparse.attention.patterns.base import pool_stride
    from vidsparse.errors import InputError

    x = torch.arange(10.0).view(1, 1, 10, 1)
    assert pool_blocks(x, 4, stride=2).flatten().tolist() == [1.0, 5.0, 8.0]  # (0+2)/2, (4+6)/2, tail 8 alone
    assert pool_blocks(x, 4, scale=2.0, stride=4).flatten().tolist() == [0.0, 8.0, 16.0]
    assert pool_blocks(torch.arange(11.0).view(1, 1, 11, 1), 4, stride=2).flatten().tolist() == [1.0, 5.0, 9.0]
    assert pool_blocks(x, 4, stride=3).flatten().tolist() == [1.5, 5.5, 8.0]  # offsets 0, 3: (0+3)/2, (4+7)/2
    assert pool_blocks(x, 4, stride=9).flatten().tolist() == [0.0, 4.0, 8.0]
    y = torch.randn(2, 3, 64, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(pool_blocks(y, 16, stride=4), pool_blocks(y[:, :, ::4], 4), rtol=0, atol=0)
    with pytest.raises(InputError, match="pool stride"):
        pool_blocks(y, 16, stride=0)
    assert [pool_stride(0, b) for b in (8, 15, 16, 31, 32, 128, 256)] == [1, 1, 2, 3, 4, 16, 32]
    assert [pool_stride(0, b, samples=16) for b in (16, 31, 32, 64, 128, 256)] == [1, 1, 2, 4, 8, 16]
    assert pool_stride(3, 128) == 3 and pool_stride(3, 128, samples=16) == 3



def test_block_scores_auto_stride_follows_each_block_size():
    """stride=0 pools 8 tokens of each block on each side: 64-token query blocks every 8th token, 128-token key
    blocks every 16th, each equal to pooling those tokens by hand (GQA, a partial last key block)."""
    import math

    from vidsparse.attention.patterns.base import block_scores

    q, k, _ = qkv(b=1, h=4, hk=2, n=320, d=16, seed=9, nk=300)
    got = block_scores(q, k, SeqMeta(64, 128, causal=False), stride=0)
    qp = pool_blocks(q, 64, 1 / math.sqrt(16), stride=8)
    kp = torch.stack([k[:, :, j * 128: (j + 1) * 128: 16].mean(2) for j in range(3)], 2)
    want = torch.einsum("bhmd,bhnd->bhmn", qp, kp.repeat_interleave(2, 1))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got.shape == (1, 4, 5, 3)


@pytest.mark.parametrize("spec", ["block_topk:density=0.3", "block_cdf:tau=0.8", "pyramid"])
def test_pool_stride_scores_strided_tokens(spec):
    """A pattern with pool_stride=4 picks exactly the layout the same pattern with the exact block mean picks on
    q and k whose every token is the first of its run of 4 (the same pooled means: dyadic values, exact in fp32).
    The default: 8 tokens of each block for block_topk and pyramid (stride 4 for these 32-token blocks), the exact
    mean for block_cdf."""
    from vidsparse.attention.patterns.base import block_scores

    g = torch.Generator().manual_seed(5)
    q, k = (torch.randint(-8, 9, (1, h, 252, 32), generator=g).float() / 4 for h in (4, 2))  # tail: 7 runs of 4
    meta = SeqMeta(32, 32)
    at = lambda s: PATTERNS.from_spec(spec + ("," if ":" in spec else ":") + f"pool_stride={s}")  # noqa: E731
    firsts = lambda x, s=4: x[:, :, ::s].repeat_interleave(s, 2)[:, :, : x.shape[2]]  # noqa: E731
    assert torch.equal(block_scores(q, k, meta, stride=4), block_scores(firsts(q), firsts(k), meta))
    assert not torch.equal(block_scores(q, k, meta, stride=4), block_scores(q, k, meta))
    default = PATTERNS.from_spec(spec)
    assert default.pool_stride == (1 if spec.startswith("block_cdf") else 0)
    same = at(1 if spec.startswith("block_cdf") else 4)  # the default for 32-token blocks
    for got, want in ((at(4).estimate(q, k, meta), at(1).estimate(firsts(q), firsts(k), meta)),
                      (default.estimate(q, k, meta), same.estimate(q, k, meta))):
        if hasattr(got, "level_map"):
            assert torch.equal(got.level_map(), want.level_map())
        else:
            assert torch.equal(got.block_mask(), want.block_mask())


def test_xattention_antidiagonal_sums_equal_brute_force():
    """One strided GEMM gives each S×S tile's antidiagonal sum of QKᵀ."""
    s, d = 4, 8
    q, k, _ = qkv(h=1, hk=1, n=32, d=d, seed=5)
    qs = torch.cat([q[:, :, s - 1 - j :: s] for j in range(s)], -1)
    ks = torch.cat([k[:, :, j::s] for j in range(s)], -1)
    fast = (qs @ ks.transpose(-1, -2))[0, 0]
    full = (q @ k.transpose(-1, -2))[0, 0]
    for i in range(8):
        for j in range(8):
            tile = full[i * s : (i + 1) * s, j * s : (j + 1) * s]
            assert fast[i, j] == pytest.approx(torch.fliplr(tile).diagonal().sum().item(), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("b,h,hk,nq,nk,causal,tiles", [(1, 4, 2, 200, 200, True, (16, 16, 1)),
                                                      (2, 2, 1, 100, 300, True, (16, 32, 2)),
                                                      (1, 2, 2, 150, 130, False, (16, 16, 3)),
                                                      (1, 2, 1, 256, 256, True, (128, 128, 1)),
                                                      (1, 4, 2, 200, 200, True, (16, 16, 4)),
                                                      (1, 2, 2, 512, 512, True, (16, 16, 8))])
def test_xattention_fused_kernel_equals_torch(interpreter, monkeypatch, b, h, hk, nq, nk, causal, tiles):
    """The fused antidiagonal kernel (strided scores, softmax and block sums without the score matrix) gives the
    torch path's block masses: lengths that are not block or stride multiples, GQA, batch > 1, more keys than
    queries, several row and column tiles per program, heads processed in groups (scratch bound forced low), and
    a row tile's column tiles split over 2-8 programs (some of which get none), the last to finish combining them."""
    from vidsparse.attention.kernels import antidiagonal
    from vidsparse.attention.patterns.xattention import XAttention

    monkeypatch.setattr(antidiagonal, "SCRATCH_BYTES", 1)  # one head per launch: the group offsets are exercised
    g = torch.Generator().manual_seed(nq + nk)
    q = 2 * torch.randn(b, h, nq, 16, generator=g)
    k = 2 * torch.randn(b, hk, nk, 16, generator=g)
    meta = SeqMeta(32, 32, causal)
    want = XAttention(stride=4, chunk_tokens=64)._mass_torch(q, k, meta)
    got = antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, causal, block_m=tiles[0], block_n=tiles[1],
                                               splits=tiles[2])
    torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    torch.testing.assert_close(got.sum(-1), torch.full(got.shape[:-1], 8.0), atol=1e-4, rtol=0)  # rows sum to 1


def test_xattention_splits_rule(monkeypatch):
    """8 programs per row tile where a head group's programs would fill fewer than two per SM with 4 and the longest
    row tile has 8 column tiles: 28/28 heads at 16K–64K, stride 8 (stride 16 from 32K); 4 otherwise (28/4 heads,
    128K). ``VIDSPARSE_ANTIDIAG_SPLITS`` fixes it, 0 is the rule."""
    import triton

    from vidsparse.attention.kernels.antidiagonal import default_splits, head_group, launch_defaults
    from vidsparse.errors import InputError

    def splits(n, hk, s):
        tile = launch_defaults(s, 128)[0]
        return default_splits(min(28, head_group(28 // hk, n * 256)), triton.cdiv(n // s, 128),
                              triton.cdiv(n // s, tile), torch.device("cpu"))

    cases = [(16384, 28, 8), (16384, 28, 16), (32768, 28, 8), (32768, 28, 16), (65536, 28, 8), (131072, 28, 8),
             (16384, 4, 8), (65536, 4, 16), (131072, 4, 8)]
    assert [splits(*c) for c in cases] == [8, 4, 8, 8, 8, 4, 4, 4, 4]
    monkeypatch.setenv("VIDSPARSE_ANTIDIAG_SPLITS", "3")
    assert splits(16384, 28, 8) == splits(16384, 4, 8) == 3
    monkeypatch.setenv("VIDSPARSE_ANTIDIAG_SPLITS", "0")
    assert splits(16384, 28, 8) == 8
    monkeypatch.setenv("VIDSPARSE_ANTIDIAG_SPLITS", "eight")
    with pytest.raises(InputError, match="VIDSPARSE_ANTIDIAG_SPLITS='eight'"):
        splits(16384, 28, 8)


@pytest.mark.parametrize("scratch", [None, 1])
def test_xattention_fused_kernel_head_groups_change_only_the_order(interpreter, monkeypatch, scratch):
    """Issuing the programs in groups of heads (``heads_together``: 1, 2, 4, 5 of the 12 heads of 2 sequences × 6
    query heads over 2 K/V heads, so that groups split K/V-head groups and, at 5, the last group is smaller) gives
    exactly the masses of all heads at once, also where the scratch bound cuts the heads into launches of one; bad
    values are a ValueError."""
    from vidsparse.attention.kernels import antidiagonal
    from vidsparse.attention.patterns.xattention import XAttention

    if scratch is not None:
        monkeypatch.setattr(antidiagonal, "SCRATCH_BYTES", scratch)
    g = torch.Generator().manual_seed(11)
    q, k = 2 * torch.randn(2, 6, 150, 16, generator=g), 2 * torch.randn(2, 2, 150, 16, generator=g)
    run = lambda hg: antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, True, block_m=16, block_n=16,  # noqa: E731
                                                          splits=2, heads_together=hg)
    every = run(12)
    for hg in (1, 2, 4, 5):
        assert torch.equal(run(hg), every), hg
    want = XAttention(stride=4, chunk_tokens=64)._mass_torch(q, k, SeqMeta(32, 32, True))
    torch.testing.assert_close(every, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    with pytest.raises(ValueError, match="heads_together must be at least 1"):
        run(0)


@pytest.mark.parametrize("name,bad", [("VIDSPARSE_POOLED_TOPK_BM", "8"), ("VIDSPARSE_POOLED_TOPK_WARPS", "6"),
                                      ("VIDSPARSE_POOLED_TOPK_TOKENS", "many"), ("VIDSPARSE_POOLED_TOPK_SLICE", "-1"),
                                      ("VIDSPARSE_SELECT_FEW", "-2"), ("VIDSPARSE_ANTIDIAG_SPLITS", "1.5"),
                                      ("VIDSPARSE_POOL_KEYS_BLOCKS", "3"), ("VIDSPARSE_TOPK_KEYS", "cuda")])
def test_bad_kernel_knobs_are_input_errors(interpreter, monkeypatch, name, bad):
    """A tuning knob that is not a whole number in its range (a power of two where the launch needs one), or a mode
    that is not one of its choices, stops the call with an ``InputError`` naming the variable (exit code 2), not a
    ``ValueError`` or a Triton build error; unset, the default launch runs."""
    from vidsparse.errors import InputError

    q = torch.randint(-3, 4, (1, 2, 256, 64), generator=torch.Generator().manual_seed(1)) / 4.0
    spec = "xattention:stride=4,backend=kernel" if "ANTIDIAG" in name else "block_topk:density=0.3,backend=kernel"
    pat = PATTERNS.from_spec(spec)
    pat.estimate(q, q, SeqMeta(32, 32))
    monkeypatch.setenv(name, bad)
    with pytest.raises(InputError, match=f"{name}='{bad}'"):
        pat.estimate(q, q, SeqMeta(32, 32))


def test_key_pooling_blocks_per_program_rule(monkeypatch):
    """``pooled_topk.key_blocks``: 4 key blocks per program, doubled while there would be more than two programs per
    SM (132 off CUDA): 28/4 heads at 16K keep 4 (128 programs), 28/28 take 16 (224); never past the row;
    ``VIDSPARSE_POOL_KEYS_BLOCKS`` fixes the number."""
    from vidsparse.attention.kernels.pooled_topk import key_blocks

    cpu = torch.device("cpu")
    assert key_blocks(4, 128, cpu) == 4 and key_blocks(28, 128, cpu) == 16 and key_blocks(28, 64, cpu) == 8
    assert key_blocks(10000, 3, cpu) == 4  # 3 key blocks: one program per head, however many heads
    monkeypatch.setenv("VIDSPARSE_POOL_KEYS_BLOCKS", "2")
    assert key_blocks(28, 128, cpu) == 2


def test_antidiagonal_head_group_rule(monkeypatch):
    """Whole K/V-head groups whose K fits the budget, at least one; a budget of 0 MB: every head at once."""
    from vidsparse.attention.kernels.antidiagonal import head_group
    from vidsparse.errors import InputError

    monkeypatch.setenv("VIDSPARSE_ANTIDIAG_HEAD_MB", "24")
    assert head_group(7, 8 << 20) == 21  # three K/V heads of 8 MB, 7 query heads each
    assert head_group(1, 8 << 20) == 3
    assert head_group(1, 32 << 20) == 1  # one head's K past the budget: still one
    monkeypatch.setenv("VIDSPARSE_ANTIDIAG_HEAD_MB", "0")
    assert head_group(1, 8 << 20) >= 1 << 20
    monkeypatch.delenv("VIDSPARSE_ANTIDIAG_HEAD_MB")
    assert head_group(7, 8 << 20) == 7  # the default, 4 MB: one K/V head (16K tokens: 4 MB; 32K: 8 MB)
    assert head_group(1, 4 << 20) == 1 and head_group(1, 2 << 20) == 2  # 8K tokens: two heads of 2 MB
    monkeypatch.setenv("VIDSPARSE_ANTIDIAG_HEAD_MB", "12MB")
    with pytest.raises(InputError, match="VIDSPARSE_ANTIDIAG_HEAD_MB='12MB'"):
        head_group(7, 8 << 20)


@pytest.mark.parametrize("b,h,hk,nq,nk,causal", [(2, 4, 2, 200, 200, True), (1, 2, 1, 96, 160, True),
                                                  (1, 2, 2, 160, 120, False)])
def test_xattention_fused_kernel_tma_rows_equal_pointer_rows(interpreter, b, h, hk, nq, nk, causal):
    """The kernel's TMA path (strided rows as boxes of a [B·heads, N/S, S·D] descriptor, zero-filled past N/S) gives
    exactly the pointer path's masses, and the torch path's within fp32 tolerance: fp16, lengths that are stride but
    not block multiples, GQA, batch > 1, and a transposed (non-contiguous) q and k that the TMA path copies."""
    from vidsparse.attention.kernels import antidiagonal
    from vidsparse.attention.patterns.xattention import XAttention

    g = torch.Generator().manual_seed(nq * 3 + nk)
    q = (2 * torch.randn(b, nq, h, 16, generator=g)).half().transpose(1, 2)  # a model's layout: [B, N, H, D] storage
    k = (2 * torch.randn(b, nk, hk, 16, generator=g)).half().transpose(1, 2)
    got = antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, causal, block_m=16, block_n=16, tma=True)
    ptr = antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, causal, block_m=16, block_n=16, tma=False)
    assert torch.equal(got, ptr)
    want = XAttention(stride=4, chunk_tokens=64)._mass_torch(q.float(), k.float(), SeqMeta(32, 32, causal))
    torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


@pytest.mark.parametrize("tma", [False, True])
def test_xattention_fused_kernel_head_dim_slices(interpreter, tma):
    """Products in head-dim slices (``block_d`` < D: each stride phase in two steps of 16 columns) give the torch
    path's masses and the whole-D kernel's within fp32 tolerance, through pointer loads and TMA boxes; a slice that
    does not divide D is refused."""
    from vidsparse.attention.kernels import antidiagonal
    from vidsparse.attention.patterns.xattention import XAttention

    g = torch.Generator().manual_seed(5)
    q = (2 * torch.randn(2, 4, 192, 32, generator=g)).half()
    k = (2 * torch.randn(2, 2, 192, 32, generator=g)).half()
    sliced = antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, True, block_m=16, block_n=16, tma=tma, block_d=16)
    whole = antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, True, block_m=16, block_n=16, tma=tma)
    want = XAttention(stride=4, chunk_tokens=64)._mass_torch(q.float(), k.float(), SeqMeta(32, 32, True))
    torch.testing.assert_close(sliced, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    torch.testing.assert_close(sliced, whole, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    with pytest.raises(ValueError, match="block_d"):
        antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, True, block_d=24)


def test_xattention_uses_the_fused_kernel_when_asked(interpreter, monkeypatch):
    """backend="kernel" routes through the fused kernel (counted by a wrapper that calls it) and picks the torch
    path's blocks; "reference" and a strided block that is not a power of two stay on torch."""
    from vidsparse.attention.kernels import antidiagonal

    calls = []
    real = antidiagonal.antidiagonal_block_mass
    monkeypatch.setattr(antidiagonal, "antidiagonal_block_mass", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, _ = qkv(h=2, hk=1, n=192, d=16, seed=9)
    meta = SeqMeta(32, 32)
    fused = PATTERNS.from_spec("xattention:stride=4,backend=kernel").estimate(q, k, meta)
    assert len(calls) == 1
    torch_ = PATTERNS.from_spec("xattention:stride=4,backend=reference").estimate(q, k, meta)
    assert len(calls) == 1
    assert torch.equal(fused.block_mask(), torch_.block_mask())
    PATTERNS.from_spec("xattention:stride=4,backend=kernel").estimate(q, k, SeqMeta(48, 32))  # 48/4 = 12 rows
    assert len(calls) == 1 and not antidiagonal.supported(q, k, 4, 48, 32)


@pytest.mark.parametrize("nq,nk,causal,sink,local,budget", [(700, 700, True, 2, 3, 0.3), (300, 900, True, 1, 1, 0.2),
                                                              (640, 500, False, 1, 2, 0.25),
                                                              (1057, 1057, True, 0, 0, 0.05),  # 1056 = 33·32
                                                              (2200, 2200, True, 1, 1, 0.6),
                                                              (1500, 2600, True, 1, 2, 0.3)])
def test_block_select_kernel_equals_torch_topk(interpreter, monkeypatch, nq, nk, causal, sink, local, budget):
    """The in-register sort selects exactly the blocks torch's biased topk selects, for every row's own budget. Past
    64 key blocks causal rows run in narrower launches here (``SPLIT_FROM`` lowered to 128 so that small rows take
    that path: 2200: widths 32, 64 and 128, output 42 wide; 1500 queries on 2600 keys: the rows start at block 34)."""
    import math

    from vidsparse.attention.kernels import block_select
    from vidsparse.attention.patterns.base import block_scores, topk_layout

    monkeypatch.setattr(block_select, "SPLIT_FROM", 128)

    q = torch.randn(1, 2, nq, 16, generator=torch.Generator().manual_seed(nq))  # small: the interpreter is slow
    k = torch.randn(1, 1, nk, 16, generator=torch.Generator().manual_seed(nk))
    meta = SeqMeta(32, 32, causal)
    s = block_scores(q, k, meta, masked=False)
    nqb, nkb = s.shape[-2:]
    rows = causal_block_mask(nqb, nkb, 32, 32, nq, nk).sum(-1) if causal else torch.full((nqb,), nkb)
    per_row = torch.ceil(rows.double() * budget).long()
    width = max(math.ceil(nkb * budget), sink + local)
    want = topk_layout(s.clone(), per_row, width, q, k, meta, sink, local, backend="reference")
    got = topk_layout(s.clone(), per_row, width, q, k, meta, sink, local, backend="kernel")
    assert torch.equal(got.kv_count, want.kv_count)
    assert torch.equal(got.kv_index, want.kv_index)
    assert torch.equal(got.kv_full, want.kv_full)
    assert int(got.kv_count.min()) >= 1


def test_selection_splits_causal_rows_from_256_key_blocks(monkeypatch):
    """Causal rows run in one launch up to 128 key blocks (16K tokens in 128-token blocks) and in narrower launches
    from 256 (widths 64, 128 and 256 at 32K); ``VIDSPARSE_SELECT_SPLIT=0`` keeps one launch."""
    from vidsparse.attention.kernels.block_select import _row_groups

    assert _row_groups(128, 128, 128, 128, 16384, 16384, True) == [(0, 128, 128)]
    assert _row_groups(256, 256, 128, 128, 32768, 32768, True) == [(0, 64, 64), (64, 64, 128), (128, 128, 256)]
    assert _row_groups(256, 256, 128, 128, 32768, 32768, False) == [(0, 256, 256)]
    monkeypatch.setenv("VIDSPARSE_SELECT_SPLIT", "0")
    assert _row_groups(256, 256, 128, 128, 32768, 32768, True) == [(0, 256, 256)]


@pytest.mark.parametrize("few", ["0", "100000"])
def test_block_select_breaks_ties_to_the_lower_index_on_both_paths(interpreter, monkeypatch, few):
    """The counting search (``VIDSPARSE_SELECT_FEW=0``) and the rounds of max-reduction (every row) keep, of tied
    scores, the lowest-indexed blocks: exactly a stable descending sort's first ``total`` of the biased row."""
    import math

    from vidsparse.attention.patterns.base import forced_blocks, row_totals, topk_layout

    monkeypatch.setenv("VIDSPARSE_SELECT_FEW", few)
    nq = nk = 2200
    meta = SeqMeta(32, 32, True)
    nqb = nkb = -(-nq // 32)
    s = torch.randint(0, 4, (1, 2, nqb, nkb), generator=torch.Generator().manual_seed(3)).float()  # 4 values: ties
    q = k = torch.zeros(1, 2, nq, 16)
    allowed = causal_block_mask(nqb, nkb, 32, 32, nq, nk)
    per_row = torch.ceil(allowed.sum(-1).double() * 0.3).long()
    width = math.ceil(nkb * 0.3)
    got = topk_layout(s.clone(), per_row, width, q, k, meta, 1, 1, backend="kernel")
    total = row_totals(per_row, width, nqb, nkb, meta, nq, nk, 1, 1, "cpu")
    biased = s.masked_fill(~allowed, float("-inf")).masked_fill(forced_blocks(nqb, nkb, meta, nq, nk, 1, 1, None)
                                                                  & allowed, float("inf"))
    order = torch.sort(biased, dim=-1, descending=True, stable=True).indices
    for m in range(nqb):
        for hh in range(2):
            want = order[0, hh, m, : int(total[m])].sort().values.int()
            assert torch.equal(got.kv_index[0, hh, m, : int(total[m])], want), (m, hh)


@pytest.mark.parametrize("b,h,hk,nq,nk,causal,spec,few,slice_entries,transposed,keys", [
    (1, 4, 2, 304, 304, True, "block_topk:density=0.2", "16", 8192, False, "pdl"),  # a partial last block: 8 pooled
    (2, 4, 1, 304, 560, True, "block_topk:density=0.3,sink=2,local=2", "0", 512, True, "pdl"),  # search; 4 slices
    (1, 2, 2, 256, 256, False, "block_topk:topk=3,sink=0,local=0", "100000", 8192, False, "torch"),
    (1, 6, 3, 512, 512, True, "block_topk:density=0.5,pool_stride=1", "16", 1024, True, "kernel"),  # two heads' rows
    (1, 4, 2, 640, 640, True, "block_topk:density=0.3,pool_stride=3", "16", 8192, False, "pdl")])  # 11 of 16 loaded
def test_pooled_topk_kernel_equals_torch(interpreter, monkeypatch, b, h, hk, nq, nk, causal, spec, few,
                                         slice_entries, transposed, keys):
    """``block_topk``'s fused estimate (q's pooling, the scores and the selection in one kernel) writes exactly the
    unfused kernels' layout (indices, counts, ``kv_full``) where the fp32 sums are exact: dyadic q/k with few bits, head
    dim 64 (scale 1/8), power-of-two token counts per pooled block. The keys repeat every three blocks, so most
    selections break ties (to the lower index; not where 11 tokens a block are pooled, below); GQA, batch 2, more
    keys than queries, not causal, a model's transposed q/k, the head-dim slices of the product (``SLICE_ENTRIES``), the rounds of max-reduction and the counting search
    (``VIDSPARSE_SELECT_FEW``); the keys pooled by the Triton kernel (``VIDSPARSE_TOPK_KEYS``: "pdl", the default,
    is the same kernel where no dependent launch runs, as here) or by torch.
    """
    from vidsparse.attention.kernels import pooled_topk

    monkeypatch.setenv("VIDSPARSE_SELECT_FEW", few)
    monkeypatch.setenv("VIDSPARSE_TOPK_KEYS", keys)
    monkeypatch.setenv("VIDSPARSE_POOLED_TOPK_SLICE", str(slice_entries))
    g = torch.Generator().manual_seed(nq + nk + h)

    def mk(heads, n):
        x = torch.randint(-3, 4, (b, n, heads, 64) if transposed else (b, heads, n, 64), generator=g) / 4.0
        return x.transpose(1, 2) if transposed else x

    q, k = mk(h, nq).to(torch.bfloat16), mk(hk, nk).to(torch.bfloat16)
    if "pool_stride=3" not in spec:  # the keys repeat every 3 blocks: each row's scores tie in 3 groups
        k = k[:, :, torch.arange(nk) % 96]
    # (not at stride 3: 11 pooled tokens a block make the means inexact, so tied blocks' products can round apart
    # by the order of a dot's sums, which in the interpreter depends on the CPU's BLAS path: seen on an AVX2 host)
    meta = SeqMeta(32, 32, causal)
    seen = []
    real = pooled_topk.pooled_topk
    monkeypatch.setattr(pooled_topk, "pooled_topk", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    pat = PATTERNS.from_spec(spec + ",backend=kernel")
    got = pat.estimate(q, k, meta)
    assert seen, "the fused kernel did not run"
    monkeypatch.setenv("VIDSPARSE_TOPK_FUSED", "0")
    want = pat.estimate(q, k, meta)  # the scores kernel and block_select: ties to the lower index, as a stable sort
    assert len(seen) == 1
    assert torch.equal(PATTERNS.from_spec(spec + ",backend=reference").estimate(q, k, meta).block_mask().sum(-1),
                       want.block_mask().sum(-1))  # torch's topk keeps as many (its tie order is unspecified)
    assert torch.equal(got.kv_count, want.kv_count)
    assert torch.equal(got.kv_index, want.kv_index)
    assert torch.equal(got.kv_full, want.kv_full)
    assert 0 < int(want.kv_count.sum()) < want.kv_count.numel() * -(-nk // 32)  # neither empty nor dense


@pytest.mark.parametrize("b,hk,n,d,block,stride,dtype,transposed", [
    (1, 2, 304, 64, 32, 2, torch.bfloat16, False),  # a partial last block of 8 tokens: 4 pooled
    (2, 3, 200, 24, 64, 3, torch.float16, True),  # 22 of 32 loaded; head dim 24 of 32 columns; 8-token tail: 3
    (1, 1, 96, 16, 32, 1, torch.float32, False),  # the exact mean, in two loads of 16
    (1, 2, 1000, 32, 128, 8, torch.bfloat16, True)])  # 16 of 128 tokens, as block_topk's default
def test_pool_keys_kernel_equals_pool_blocks(interpreter, b, hk, n, d, block, stride, dtype, transposed):
    """``pooled_topk``'s key pooling (``_pool_keys``) writes ``pool_blocks``'s bits where the fp32 sums are exact
    (dyadic k): the sampled tokens, their count in a partial last block, head dims that are not a power of two,
    strided (a model's transposed) k."""
    from vidsparse.attention.kernels.pooled_topk import pool_keys
    from vidsparse.attention.patterns.base import pool_blocks

    g = torch.Generator().manual_seed(n + d)
    shape = (b, n, hk, d) if transposed else (b, hk, n, d)
    k = (torch.randint(-7, 8, shape, generator=g) / 8.0).to(dtype)
    k = k.transpose(1, 2) if transposed else k
    got = pool_keys(k, block, stride)
    want = pool_blocks(k, block, stride=stride)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)
    assert pool_keys(k[:, :, :0], block, stride).shape == (b, hk, 0, d)


def test_pooled_topk_is_switched_by_width_and_environment(interpreter, monkeypatch):
    """Layouts wider than ``UP_TO`` key blocks, and ``VIDSPARSE_TOPK_FUSED=0``, keep the scores and the selection
    apart (the unfused kernels): the same layout on q/k that pool exactly."""
    from vidsparse.attention.kernels import block_select, pooled_topk

    assert pooled_topk.fits(128, 128) and not pooled_topk.fits(129, 128) and not pooled_topk.fits(128, 96)
    q = (torch.randint(-3, 4, (1, 2, 320, 64), generator=torch.Generator().manual_seed(5)) / 4.0)
    calls = []
    real = block_select.select_blocks
    monkeypatch.setattr(block_select, "select_blocks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pat = PATTERNS.from_spec("block_topk:density=0.3,backend=kernel")
    fused = pat.estimate(q, q, SeqMeta(32, 32))
    assert not calls
    monkeypatch.setenv("VIDSPARSE_TOPK_FUSED", "0")
    apart = pat.estimate(q, q, SeqMeta(32, 32))
    assert calls
    assert torch.equal(fused.kv_index, apart.kv_index) and torch.equal(fused.kv_count, apart.kv_count)
    monkeypatch.delenv("VIDSPARSE_TOPK_FUSED")
    monkeypatch.setattr(pooled_topk, "UP_TO", 8)  # 10 key blocks: wider than that
    calls.clear()
    pat.estimate(q, q, SeqMeta(32, 32))
    assert calls


@pytest.mark.parametrize("dtype,block,transposed,causal", [(torch.float32, 32, False, True),
                                                        (torch.float16, 24, True, False),
                                                        (torch.float32, 64, True, True)])
def test_pooled_scores_kernel_equals_torch(interpreter, dtype, block, transposed, causal):
    """The score product (GQA: 3 query heads per key head, batch 2, keys of another length, head dim 24 padded to
    32, partial last blocks, a model's transposed q/k) equals the torch path within fp32 rounding; the causal mask
    lands on the same entries."""
    from vidsparse.attention.patterns.base import block_scores

    g = torch.Generator().manual_seed(block)
    mk = lambda hh, n: (torch.randn(2, n, hh, 24, generator=g).transpose(1, 2) if transposed  # noqa: E731
                        else torch.randn(2, hh, n, 24, generator=g)).to(dtype)
    q, k = mk(6, 300), mk(2, 350)
    meta = SeqMeta(block, block, causal)
    got, want = block_scores(q, k, meta, backend="kernel"), block_scores(q, k, meta, backend="reference")
    assert got.shape == want.shape == (2, 6, -(-300 // block), -(-350 // block))
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and bool(torch.isinf(want).any()) == causal
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


@pytest.mark.parametrize("spec", ["xattention:backend=gpu", "block_cdf:backend=Kernel", "vertical_slash:backend=torch",
                                  "pbs:backend=triton", "token_sparse:backend=cuda"])
def test_unknown_estimation_backend_is_a_spec_error(spec):
    """A misspelt backend is refused when the spec is parsed (it used to fall back to torch silently)."""
    from vidsparse.errors import SpecError

    with pytest.raises(SpecError, match="backend must be one of auto, kernel, reference"):
        PATTERNS.from_spec(spec)


@pytest.mark.parametrize("nq,nk,causal,sink,local,tau,tied,rows", [
    (700, 700, True, 1, 1, 0.9, False, "1024"), (700, 700, True, 1, 1, 0.9, False, "1"),
    (300, 900, True, 2, 2, 0.5, True, "1024"), (300, 900, True, 2, 2, 0.5, True, "1"),
    (640, 500, False, 1, 1, 0.99, False, "1024"), (1057, 1057, True, 0, 0, 1.0, False, "1024"),
    (500, 500, True, 1, 1, 0.0, True, "1024"), (600, 600, False, 0, 1, 0.7, True, "1024")])
def test_mass_selection_kernel_equals_torch_sort(interpreter, monkeypatch, nq, nk, causal, sink, local, tau, tied,
                                                 rows):
    """The kernel's binary search on the masses keeps exactly the blocks the torch path's stable sort and cumulative
    sum keep, plus the forced ones, and writes the same layout: tau 0 (forced blocks only) and 1 (every positive
    block), all-zero rows, and tied masses (multiples of 1/8, whose sums are exact) going to the lower index. Rows
    share programs (``VIDSPARSE_SELECT_ROWS=1024`` entries: 32 rows of 32 blocks, the last program partly empty) or
    take one each."""
    from vidsparse.attention.patterns.base import mass_layout

    monkeypatch.setenv("VIDSPARSE_SELECT_ROWS", rows)
    meta = SeqMeta(32, 32, causal)
    nqb, nkb = -(-nq // 32), -(-nk // 32)
    g = torch.Generator().manual_seed(nq + nk)
    if tied:
        probs = torch.randint(0, 4, (2, 3, nqb, nkb), generator=g).float() / 8
    else:
        probs = torch.softmax(3 * torch.randn(2, 3, nqb, nkb, generator=g), -1)
    if causal:
        probs = probs * causal_block_mask(nqb, nkb, 32, 32, nq, nk)
    probs[0, 1, nqb // 2] = 0.0  # a row with no mass: only its forced blocks
    q, k = torch.zeros(2, 3, nq, 16), torch.zeros(2, 3, nk, 16)
    want = mass_layout(probs, tau, q, k, meta, sink, local, backend="reference")
    got = mass_layout(probs, tau, q, k, meta, sink, local, backend="kernel")
    assert torch.equal(got.kv_count, want.kv_count)
    assert torch.equal(got.kv_index, want.kv_index)
    assert torch.equal(got.kv_full, want.kv_full)
    if tau > 0 and tied:  # the ties were real: some row kept only part of a group of equal masses
        kept = want.block_mask()
        assert any(bool(((probs[i] == v) & kept[i]).any() and ((probs[i] == v) & ~kept[i]).any())
                   for i in range(2) for v in (0.125, 0.25, 0.375))


@pytest.mark.parametrize("n,frac,sink,window_start,visual,resident,chunk", [
    (300, 0.3, 4, 268, (10, 280), True, "4096"),  # a row in registers; text and window protected
    (1000, 0.5, 2, 900, None, False, "128"),  # read chunk by chunk at each step (8 chunks, the last partial)
    (1000, 0.5, 2, 900, None, True, "128"),  # searched in registers, written in chunks
    (77, 0.0, 1, 70, (3, 77), False, "32"),  # budget 0: only zero scores go
    (77, 1.0, 0, 77, None, True, "4096"),  # budget the whole: every droppable token goes
    (513, 0.2, 0, 500, (0, 400), False, "64"),
    (256, 0.5, 0, 256, None, True, "64"),  # every token droppable
])
def test_token_selection_kernel_equals_torch_sort(interpreter, monkeypatch, n, frac, sink, window_start, visual,
                                                  resident, chunk):
    """``token_select.drop_light`` drops exactly the tokens ``token_sparse``'s torch path drops (its stable ascending
    sort's prefix whose cumulative sum is within the budget, a sum equal to it included) and writes the same index
    and count: batch 2, ties (multiples of 1/64, whose sums are exact) split by index — also across the writing
    pass's chunks — an all-zero row, rows in registers and read in chunks."""
    from vidsparse.attention.kernels.token_select import drop_light
    from vidsparse.attention.patterns.token_sparse import drop_light_reference

    # rows longer than VIDSPARSE_TOKSEL_RESIDENT: weights written once, read in chunks at each step; the writing
    # pass reads every row in chunks
    monkeypatch.setenv("VIDSPARSE_TOKSEL_RESIDENT", "4096" if resident else "16")
    monkeypatch.setenv("VIDSPARSE_TOKSEL_CHUNK", chunk)
    raw = torch.randint(0, 8, (2, 3, n), generator=torch.Generator().manual_seed(n)).float() / 64
    raw[0, 1] = 0.0
    raw[1, 2, : n // 3] = 0.0  # many zeros: dropped at any budget
    raw[1, 0] = 1 / 64  # one tie across the row: at frac 0.5 a running sum meets the budget exactly (kept ≤, dropped)
    want = drop_light_reference(raw, frac, sink, window_start, visual)
    got = drop_light(raw, frac, sink, window_start, visual)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    kept = torch.zeros(2, 3, n + 1, dtype=torch.bool).scatter_(2, torch.where(want[0] < 0, n, want[0]), True)[..., :n]
    lo, hi = max(sink, visual[0] if visual else 0), min(window_start, visual[1] if visual else n)
    assert int(kept[0, 1].sum()) == n - (hi - lo)  # the all-zero row: every droppable token dropped
    if 0 < frac < 1:  # the ties were real: some row kept only part of a group of equal scores
        assert any(bool(((raw[i, j] == x) & kept[i, j]).any() and ((raw[i, j] == x) & ~kept[i, j]).any())
                   for i in range(2) for j in range(3) for x in raw[i, j].unique().tolist())


@pytest.mark.parametrize("resident", ["32768", "16"])
def test_token_selection_kernel_keeps_the_budget_on_softmax_scores(interpreter, monkeypatch, resident):
    """On continuous scores (where a token whose running mass lands within rounding of the budget may go either
    way) the kernel's drop stays within the budget, is maximal, protects the sink and the window, and its count
    differs from the torch path's by at most one token per row: the row in registers and read in chunks."""
    from vidsparse.attention.kernels.token_select import drop_light
    from vidsparse.attention.patterns.token_sparse import drop_light_reference

    monkeypatch.setenv("VIDSPARSE_TOKSEL_RESIDENT", resident)
    monkeypatch.setenv("VIDSPARSE_TOKSEL_CHUNK", "256")
    raw = torch.softmax(2 * torch.randn(1, 4, 600, generator=torch.Generator().manual_seed(1)), -1)
    index, count = drop_light(raw, 0.25, 4, 560)
    kept = torch.zeros(1, 4, 601, dtype=torch.bool).scatter_(2, torch.where(index < 0, 600, index), True)[..., :600]
    droppable = torch.zeros(600, dtype=torch.bool)
    droppable[4:560] = True
    dropped, total = (raw * ~kept).sum(-1), raw.sum(-1)
    assert (dropped <= 0.25 * total * (1 + 1e-6)).all() and bool(kept[..., ~droppable].all())
    lightest_kept = torch.where(kept & droppable, raw, torch.inf).min(-1).values
    assert (dropped + lightest_kept > 0.25 * total * (1 - 1e-6)).all()
    assert ((count - drop_light_reference(raw, 0.25, 4, 560)[1]).abs() <= 1).all() and (count < 600).all()


@pytest.mark.parametrize("nq,nk,causal,sink,local,spec,rows", [
    (700, 700, True, 1, 1, "pyramid", "1024"), (700, 700, True, 1, 1, "pyramid", "1"),
    (300, 900, True, 2, 2, "pyramid:exact=0.1,pool2=0.2,pool4=0.4,pool8=0.8", "1024"),
    (640, 500, False, 1, 1, "pyramid", "1024"), (640, 500, False, 1, 1, "pyramid", "1"),
    (1057, 1057, True, 0, 0, "pyramid:exact=0,pool2=0.3,pool4=0.6,pool8=1", "1024"),
    (500, 500, True, 1, 1, "pyramid:exact=0.05,pool2=0.05,pool4=0.5,pool8=0.5", "1024"),
    (2200, 2200, True, 1, 1, "pyramid:exact=0.2,pool2=0.5,pool4=0.7,pool8=0.9", "1024")])  # narrower launches
def test_pyramid_level_kernel_equals_torch_sort(interpreter, monkeypatch, nq, nk, causal, sink, local, spec, rows):
    """The four nested radix searches give every block the level torch's sort of the row gives it, and write each
    level's layout exactly as the mask conversion does; with tied scores (rounded to a few values) ties go to the
    lower block index on both paths. The kernel reads scores without the causal mask (what ``estimate`` gives it) or
    with it (the rounded case) alike, against the torch path's masked scores. Rows share programs (1,024 entries
    each, the last program partly empty) or take one each."""
    from vidsparse.attention.kernels import block_select
    from vidsparse.attention.patterns.base import block_scores

    monkeypatch.setattr(block_select, "SPLIT_FROM", 128)  # 2200 tokens in 32-token blocks: the narrower launches
    monkeypatch.setenv("VIDSPARSE_SELECT_ROWS", rows)

    pat = PATTERNS.from_spec(spec)
    pat.sink, pat.local = sink, local
    q = torch.randn(1, 2, nq, 16, generator=torch.Generator().manual_seed(nq))  # small: the interpreter is slow
    k = torch.randn(1, 1, nk, 16, generator=torch.Generator().manual_seed(nk))
    meta = SeqMeta(32, 32, causal)
    raw = block_scores(q, k, meta, masked=False)
    rounded = (block_scores(q, k, meta) * 2).round() / 2
    assert not causal or bool(torch.isfinite(raw).all()) and bool(torch.isinf(rounded).any())
    for s, given in ((block_scores(q, k, meta), raw), (rounded, rounded)):
        want = pat.layout_from_scores(s, meta, nq, nk, backend="reference")
        got = pat.layout_from_scores(given, meta, nq, nk, backend="kernel")
        assert torch.equal(got.level_map(), want.level_map())
        for a, b in zip((got.exact, *got.pooled), (want.exact, *want.pooled)):
            assert torch.equal(a.block_mask(), b.block_mask())
            assert torch.equal(a.kv_count, b.kv_count)
            w = b.kv_index.shape[-1]
            assert a.kv_index.shape[-1] >= int(b.kv_count.max())  # the host-side width bounds every row
            valid = torch.arange(max(w, a.kv_index.shape[-1])) < b.kv_count[..., None]
            pad = lambda x: torch.nn.functional.pad(x, (0, valid.shape[-1] - x.shape[-1]))  # noqa: E731
            assert torch.equal(torch.where(valid, pad(a.kv_index), 0), torch.where(valid, pad(b.kv_index), 0))
            assert torch.equal(torch.where(valid, pad(a.kv_full), False), torch.where(valid, pad(b.kv_full), False))
        present = set(torch.unique(got.level_map()).tolist())
        b = pat.bounds
        assert present & {2, 4, 8} == {lv for lv, lo, hi in zip((2, 4, 8), b, b[1:]) if hi > lo}  # bands covered


@pytest.mark.parametrize("causal", [True, False])
def test_pyramid_estimate_kernel_equals_reference(interpreter, causal):
    """``estimate`` end to end: the kernel path (unmasked pooled scores into the level kernel) and the torch path
    (masked scores, a sort) give every block the same level."""
    pat = PATTERNS.from_spec("pyramid:exact=0.1,pool2=0.2,pool4=0.4,pool8=0.8")
    q = torch.randn(1, 2, 600, 16, generator=torch.Generator().manual_seed(5))
    k = torch.randn(1, 1, 600, 16, generator=torch.Generator().manual_seed(6))
    meta = SeqMeta(32, 32, causal)
    got, want = pat.estimate(q, k, meta, backend="kernel"), pat.estimate(q, k, meta, backend="reference")
    assert torch.equal(got.level_map(), want.level_map())
    assert set(torch.unique(want.level_map()).tolist()) == {0, 1, 2, 4, 8}


def test_xattention_finds_planted_blocks():
    """Keys of block 3 match every query strongly: a τ=0.9 selection must keep block 3 for rows after it."""
    q, k, _ = qkv(h=2, hk=2, n=256, d=16, seed=2)
    k[:, :, 96:128] = q[:, :, 200:201] * 4  # block 3 = strong keys
    q[:] = q[:, :, 200:201]
    lay = PATTERNS.from_spec("xattention:stride=8,tau=0.9,sink=0,local=1").estimate(q, k, SeqMeta(32, 32))
    bm = lay.block_mask()
    assert bm[0, :, 4:, 3].all()


def test_vertical_slash_covers_selected_lines():
    q, k, _ = qkv(h=2, hk=2, n=300, d=16, seed=7)
    k[:, :, 150] = q[:, :, -64:].mean(2) * 5  # a strong vertical at key 150
    lay = PATTERNS.from_spec("vertical_slash:vertical=3,slash=10,force_vertical=1,force_slash=5").estimate(
        q, k, SeqMeta(32, 32))
    bm = lay.block_mask()
    assert bm[0, :, 150 // 32 :, 150 // 32].all()  # the column's block for every query block at or after it
    assert bm[0, :, :, 0].all()  # forced first columns


@pytest.mark.parametrize("nq,nk,bq,bk,causal", [(256, 256, 16, 32, True), (256, 384, 32, 16, True),
                                                (192, 192, 16, 16, False)])
def test_vertical_slash_blocks_are_those_its_lines_cross(nq, nk, bq, bk, causal):
    """vertical_slash computes block (m, n) exactly when a kept vertical (a key column) lies in key block n or a kept
    slash (offset o: query i meets key i + (Nk − Nq) − o) passes through a (query, key) pair of the block, within the
    causal triangle: checked against that definition pair by pair, on the columns and offsets the estimate keeps
    (the probe rows' sums, the forced lines set to +inf, the top ``vertical`` / ``slash`` of each); and the block
    geometry behind it (each block's smallest and largest offset), for every block."""
    from vidsparse.attention.layout import causal_block_mask
    from vidsparse.attention.patterns.base import column_probs, keep_topk

    q, k, _ = qkv(h=2, hk=1, n=nq, d=16, seed=nq + nk)
    k = torch.randn(1, 1, nk, 16, generator=torch.Generator().manual_seed(nk))
    # few lines, so that many blocks are crossed by one kept slash only, some just at a corner
    spec = dict(vertical=3, slash=6, force_vertical=1, force_slash=1, last_q=16, backend="reference")
    lay = PATTERNS.from_spec("vertical_slash:" + ",".join(f"{a}={b}" for a, b in spec.items())).estimate(
        q, k, SeqMeta(bq, bk, causal))
    off = nk - nq
    vert, slash = column_probs(q[:, :, nq - 16:], k, torch.arange(nq - 16, nq) + off, diagonal_first=nq - 16 + off,
                               backend="reference")
    vert[..., :1], slash[..., :1] = float("inf"), float("inf")
    v_keep, s_keep = keep_topk(vert, 3), keep_topk(slash, 6)
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    o = i + off - j  # each (query, key) pair's slash offset
    # the block geometry itself: each block's running-count bounds are its pairs' smallest and largest offsets
    from vidsparse.attention.patterns.vertical_slash import _block_geometry

    cols, lo, hi = _block_geometry(nq, nk, bq, bk, None)
    blocks = o.reshape(nq // bq, bq, nk // bk, bk)
    assert torch.equal(cols, torch.arange(nk) // bk)
    assert torch.equal(lo, blocks.amin((1, 3)).clamp(0, nk)) and torch.equal(hi, (blocks.amax((1, 3)) + 1).clamp(0, nk))
    for hh in range(2):
        on_line = v_keep[0, hh][j].expand(nq, nk) | ((o >= 0) & s_keep[0, hh][o.clamp(0, nk - 1)])
        want = on_line.reshape(nq // bq, bq, nk // bk, bk).any(3).any(1)
        if causal:
            want &= causal_block_mask(nq // bq, nk // bk, bq, bk, nq, nk)
        assert torch.equal(lay.block_mask()[0, hh], want)


@pytest.mark.parametrize("r,nk", [(4, 10), (5, 5), (1, 7), (6, 40)])
def test_diagonal_sums_equal_scatter(r, nk):
    from vidsparse.attention.patterns.base import diagonal_sums

    first = nk - r
    qpos, kpos = torch.arange(first, nk)[:, None], torch.arange(nk)[None, :]
    a = torch.rand(2, 3, r, nk, generator=torch.Generator().manual_seed(r)) * (kpos <= qpos)
    diag = (qpos - kpos).clamp(min=0).expand(2, 3, r, nk)
    ref = torch.zeros(2, 3, nk).scatter_add_(-1, diag.reshape(2, 3, -1), a.reshape(2, 3, -1))
    torch.testing.assert_close(diagonal_sums(a, first), ref)


def test_needs_int64_counts_the_last_elements_offset():
    """A kernel's 64-bit variant is picked exactly when some element's offset reaches 2^31: the last element's offset
    is Σ (size − 1) · |stride| (views, transposes and negative-free slices alike), and empty tensors need none."""
    from vidsparse.attention.kernels.fit import needs_int64

    def t(size, stride):  # no storage: only the sizes and strides matter
        return torch.empty_strided(size, stride, device="meta")

    assert not needs_int64(t((2, 3), (2 ** 30, 1)))  # offsets up to 2^30 + 2
    assert needs_int64(t((3, 1), (2 ** 30, 1)))  # the third row starts at 2^31
    assert not needs_int64(t((2, 1), (2 ** 31 - 1, 1)))  # the last offset: 2^31 − 1
    assert needs_int64(t((2, 2), (2 ** 31 - 1, 1)))
    # a model's transposed [B, N, H, D] view: the row stride is H·D, so one head's late rows pass 2^31 on their own
    view = t((1, 28, 600_000, 128), (600_000 * 28 * 128, 128, 28 * 128, 1))
    assert needs_int64(view) and needs_int64(view[:, :1]) and not needs_int64(view[:, :1, :500_000])
    assert not needs_int64(t((0, 5), (2 ** 40, 1)), t((3,), (1,)))


def test_estimation_kernels_64_bit_variants_are_exact(interpreter, monkeypatch):
    """The 64-bit offset variants of the probe-row sums and of XAttention's block mass (built when inputs reach 2^31
    elements; forced here by lowering the limit) give the 32-bit variants' results bit for bit: transposed inputs,
    GQA, both load paths of the antidiagonal kernel."""
    from vidsparse.attention.kernels import antidiagonal, fit, row_mass

    g = torch.Generator().manual_seed(3)
    q = (2 * torch.randn(2, 160, 4, 16, generator=g)).half().transpose(1, 2)
    k = (2 * torch.randn(2, 160, 2, 16, generator=g)).half().transpose(1, 2)
    pos = torch.arange(96, 160)
    runs = {}
    for limit in (2 ** 31, 0):
        monkeypatch.setattr(fit, "INT32_LIMIT", limit)
        assert fit.needs_int64(q) == (limit == 0)
        runs[limit] = ([*row_mass.column_mass(q[:, :, 96:], k, pos, diagonal_first=96)] +
                       [antidiagonal.antidiagonal_block_mass(q, k, 4, 32, 32, True, block_m=16, block_n=16, tma=tma)
                        for tma in (False, True)])
    for a, b in zip(runs[2 ** 31], runs[0]):
        assert torch.equal(a, b)


def test_probe_row_passes_take_a_chunk_per_1024_keys_up_to_64(monkeypatch):
    """Key chunks (programs per head and row chunk) of the probe-row passes: one per 1,024 keys up to 64 (16 at 16K
    keys, 32 at 32K, 64 from 64K on), each of a whole number of key tiles; ``VIDSPARSE_ROW_CHUNKS`` caps them."""
    from vidsparse.attention.kernels.row_mass import BN, BN_STATS, _chunks

    assert [_chunks(n, BN_STATS) for n in (16384, 32768, 65536, 131072)] == [(8, 16), (8, 32), (8, 64), (16, 64)]
    assert _chunks(32768, BN) == (16, 32) and _chunks(300, BN_STATS) == (3, 1) and _chunks(5000, BN) == (16, 5)
    monkeypatch.setenv("VIDSPARSE_ROW_CHUNKS", "64")
    assert _chunks(16384, BN_STATS) == (2, 64)


@pytest.mark.parametrize("b,h,hk,r,nk,d,dtype,chunks,consecutive", [
    (1, 2, 1, 64, 300, 16, torch.float32, 64, True),  # one row chunk: every column one store
    (2, 4, 2, 100, 257, 32, torch.float32, 2, True),  # two row chunks (atomic columns), key chunks merged
    (1, 2, 2, 7, 50, 16, torch.float16, 64, True),  # a partial row chunk, fp16
    (1, 2, 1, 130, 400, 24, torch.float32, 3, True),  # three row chunks, a head dim that is not a power of two
    (1, 4, 2, 40, 333, 16, torch.float32, 2, False),  # probe rows at scattered positions (ZipVL): columns only
])
def test_column_mass_kernel_equals_row_probs(interpreter, monkeypatch, b, h, hk, r, nk, d, dtype, chunks,
                                             consecutive):
    """The two-pass kernel's column and diagonal sums of the probe rows' causal softmax equal torch's
    ``row_probs(...).sum(2)`` and ``diagonal_sums`` within fp32 tolerance: GQA, batch 2, model-layout (transposed)
    q and k, row counts within and past one 64-row chunk, the statistics of several key chunks merged (``MAX_CHUNKS``
    forced low), and rows at positions that are not consecutive; the columns alone (the transposed pass) likewise,
    in programs of 64 and of 16 rows, and through the rows-major pass."""
    from vidsparse.attention.kernels import row_mass
    from vidsparse.attention.patterns.base import column_probs, diagonal_sums, row_probs

    monkeypatch.setattr(row_mass, "MAX_CHUNKS", chunks)
    monkeypatch.setattr(row_mass, "KEYS_PER_CHUNK", 1)  # short rows: as many chunks as MAX_CHUNKS allows
    g = torch.Generator().manual_seed(r * 7 + nk)
    q = (2 * torch.randn(b, nk, h, d, generator=g)).to(dtype).transpose(1, 2)  # [B, N, H, D] storage, as models
    k = (2 * torch.randn(b, nk, hk, d, generator=g)).to(dtype).transpose(1, 2)
    if consecutive:
        pos = torch.arange(nk - r, nk)
    else:
        pos = torch.randperm(nk, generator=g)[:r].sort().values
    rows = q[:, :, pos]
    first = nk - r if consecutive else None
    cols, diag = row_mass.column_mass(rows, k, pos, diagonal_first=first)
    a = row_probs(rows.float(), k.float(), pos)
    torch.testing.assert_close(cols, a.sum(2), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    if consecutive:
        torch.testing.assert_close(diag, diagonal_sums(a, first), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    else:
        assert diag is None
    ref_cols, ref_diag = column_probs(rows, k, pos, diagonal_first=first, backend="reference")
    torch.testing.assert_close(cols, ref_cols, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    torch.testing.assert_close(cols.sum(-1), torch.full((b, h), float(r)), atol=1e-4, rtol=0)  # each row sums to 1
    # columns alone: the transposed pass (``_col_mass``) with its 64-row programs, with 16-row programs on 32-key
    # tiles (atomic columns past one program), and the rows-major pass (``VIDSPARSE_COL_MASS=rows``)
    for env in ({}, {"VIDSPARSE_COL_MASS_ROWS": "16", "VIDSPARSE_COL_MASS_BN": "32"}, {"VIDSPARSE_COL_MASS": "rows"}):
        with monkeypatch.context() as m:
            for var, value in env.items():
                m.setenv(var, value)
            alone, none = row_mass.column_mass(rows, k, pos)
        assert none is None
        torch.testing.assert_close(alone, a.sum(2), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL, msg=str(env))


def test_column_mass_rejects_a_scale_that_is_not_positive():
    """The statistics pass takes the max of the unscaled products, which is the scaled max only for a positive
    scale: anything else is refused before a kernel runs."""
    from vidsparse.attention.kernels import row_mass

    for scale in (0.0, -0.5):
        with pytest.raises(ValueError, match="positive"):
            row_mass.column_mass(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 8, 16), torch.arange(4, 8), scale=scale)


@pytest.mark.parametrize("b,h,hk,r,nk,strides,chunks", [
    (1, 2, 1, 64, 300, (12, 4), 1),  # one row chunk, one key chunk of three tiles (the running max rescales)
    (2, 4, 2, 70, 257, (16,), 2),  # two row chunks, the rows' statistics merged over key chunks, one stride
    (1, 2, 2, 9, 90, (5, 30), 3),  # a partial row chunk, a stride longer than a key tile's share
    (1, 2, 1, 64, 700, (256, 48), 2),  # grid's frame stride, longer than a 128-key tile; 48 does not divide 128
])
def test_phase_mass_kernel_equals_row_probs(interpreter, monkeypatch, b, h, hk, r, nk, strides, chunks):
    """``row_mass.phase_mass``: each probe row's softmax mass on the keys of its own phase modulo each stride equals
    the torch sum of ``row_probs`` under the same-phase mask within fp32 tolerance (GQA, batch 2, transposed q/k,
    rows in and past one 64-row chunk, several key chunks)."""
    from vidsparse.attention.kernels import row_mass
    from vidsparse.attention.patterns.base import row_probs

    monkeypatch.setattr(row_mass, "MAX_CHUNKS", chunks)
    monkeypatch.setattr(row_mass, "KEYS_PER_CHUNK", 1)  # short rows: as many chunks as MAX_CHUNKS allows
    g = torch.Generator().manual_seed(r + nk)
    q = (2 * torch.randn(b, nk, h, 16, generator=g)).transpose(1, 2)
    k = (2 * torch.randn(b, nk, hk, 16, generator=g)).transpose(1, 2)
    pos = torch.arange(nk - r, nk)
    got = row_mass.phase_mass(q[:, :, pos], k, pos, strides)
    a = row_probs(q[:, :, pos].float(), k.float(), pos)
    j = torch.arange(nk)
    want = torch.stack([(a * (j[None, :] % c == pos[:, None] % c)).sum(-1) for c in strides], -1)
    assert got.shape == (b, h, r, len(strides))
    torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    assert (want > 0.05).any()  # not a test of zeros
    with pytest.raises(ValueError, match="strides"):
        row_mass.phase_mass(q[:, :, pos], k, pos, (4, 8, 16))


@pytest.mark.parametrize("r,nk,strides,chunks", [
    (64, 700, (256, 48), 2),  # grid's probe rows and frame stride, two key chunks
    (100, 700, (12, 5), 64),  # 6 key chunks, the merge forced to 32 rows at once: four row blocks
    (9, 90, (30,), 3),  # one stride, a partial row block
])
def test_phase_share_merges_rows_and_picks_strides(interpreter, monkeypatch, r, nk, strides, chunks):
    """``row_mass.phase_share``: the merge kernel's mean shares equal ``phase_mass(...).mean(2)`` within fp32
    tolerance, and with ``tau`` it picks per head the first stride whose share reaches tau, else 1 — grid's torch
    loop on the same shares — at taus between the heads' shares, below them all and above them all."""
    from vidsparse.attention.kernels import row_mass

    monkeypatch.setattr(row_mass, "MAX_CHUNKS", chunks)
    monkeypatch.setattr(row_mass, "KEYS_PER_CHUNK", 1)
    monkeypatch.setattr(row_mass, "MERGE_ENTRIES", 256)  # with 6 chunks (8 wide) 32 rows a block
    g = torch.Generator().manual_seed(r + nk)
    x = torch.randn(max(strides), 16, generator=g)
    q = torch.randn(1, 4, nk, 16, generator=g)
    k = torch.randn(1, 2, nk, 16, generator=g)
    phase = torch.arange(nk) % strides[0]
    k[0, 0] += 2 * x[phase]  # K/V head 0 (query heads 0, 1): same-phase keys match, large first-stride shares
    q[0, :2] += 2 * x[phase]
    pos = torch.arange(nk - r, nk)
    got = row_mass.phase_share(q[:, :, pos], k, pos, strides)
    want = row_mass.phase_mass(q[:, :, pos], k, pos, strides).mean(2)
    assert got.shape == (1, 4, len(strides))
    torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    v = torch.unique(got)
    cuts = [float(a + b) / 2 for a, b in zip(v[:-1], v[1:]) if b - a > 1e-4][:2]
    for tau in [0.0, 1.5] + cuts:
        shares, stride = row_mass.phase_share(q[:, :, pos], k, pos, strides, tau=tau)
        assert torch.equal(shares, got)
        ref = torch.ones(1, 4, dtype=torch.long)
        for ci in reversed(range(len(strides))):
            ref = torch.where(got[..., ci] >= tau, strides[ci], ref)
        assert torch.equal(stride, ref), (tau, got)
    assert (stride != 1).any() or len(cuts) < 2  # a tau between the shares picks a stride somewhere


def test_grid_picks_the_same_strides_with_the_kernel(interpreter):
    """grid's phase masses from the kernel (backend="kernel") and from torch ("reference") give the same captured
    shares within fp32 tolerance and the same groups, on q/k with a planted per-head stride."""
    g = torch.Generator().manual_seed(9)
    s, t, f = 8, 10, 12
    n = s + t * f
    x = torch.randn(f, 16, generator=g)
    q = torch.randn(1, 4, n, 16, generator=g)
    k = torch.randn(1, 2, n, 16, generator=g)
    phase = torch.arange(t * f) % f
    k[0, 0, s:] += 3 * x[phase]  # K/V head 0: tokens at the same spatial position match
    q[0, :2, s:] += 3 * x[phase]
    meta = SeqMeta(visual=(s, s + t * f), tokens_per_frame=f, frame_hw=(3, 4))
    got = PATTERNS.from_spec("grid:backend=kernel,probe=40")
    want = PATTERNS.from_spec("grid:backend=reference,probe=40")
    torch.testing.assert_close(got.captured(q, k, (s, s + t * f), [f, 4]), want.captured(q, k, (s, s + t * f), [f, 4]),
                               atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    a, b = got.estimate(q, k, meta), want.estimate(q, k, meta)
    assert torch.equal(a.group, b.group)
    assert (a.num_groups[0, :2] == f).all() and (a.num_groups[0, 2:] < f).all()


@pytest.mark.parametrize("nq,nk,causal,spec,rows", [
    (320, 320, True, "pbs:segment=64,last_q=80", "1024"), (320, 320, True, "pbs:segment=64,last_q=80", "1"),
    (300, 460, True, "pbs:segment=64,tau=0.5,first_block=false", "1024"),  # more keys, partial last blocks
    (320, 320, False, "pbs:segment=96,tau=0.6", "1024")])  # not causal, segments not dividing the keys
def test_pbs_selection_kernel_equals_torch(interpreter, monkeypatch, nq, nk, causal, spec, rows):
    """pbs's one-pass selection (``select_mass`` with its own segments and first block forced) writes exactly the
    layout of its torch steps (``VIDSPARSE_PBS_SELECT=0``: the mass selection, the unions and the mask conversion),
    indices, counts and ``kv_full``, from the same scores; rows shared among programs or one each."""
    monkeypatch.setenv("VIDSPARSE_SELECT_ROWS", rows)
    q, k, _ = qkv(h=4, hk=2, n=nk, d=16, seed=nq + nk)
    q = q[:, :, nk - nq:]
    pat = PATTERNS.from_spec(spec + ",backend=kernel")
    meta = SeqMeta(32, 32, causal)
    got = pat.estimate(q, k, meta)
    monkeypatch.setenv("VIDSPARSE_PBS_SELECT", "0")
    want = pat.estimate(q, k, meta)
    assert torch.equal(got.perm, want.perm)
    a, b = got.blocks, want.blocks
    assert torch.equal(a.kv_count, b.kv_count) and torch.equal(a.kv_index, b.kv_index)
    assert torch.equal(a.kv_full, b.kv_full)
    assert 0 < int(b.kv_count.sum()) < b.kv_count.numel() * b.kv_index.shape[-1]  # neither empty nor dense


@pytest.mark.parametrize("spec", ["vertical_slash:vertical=20,slash=30,force_vertical=2,force_slash=8",
                                  "pbs:segment=64,last_q=80", "token_sparse:coverage=0.9,window=48"])
def test_probe_row_patterns_pick_the_same_layout_with_the_kernel(interpreter, spec):
    """vertical_slash, pbs and token_sparse give the same layout whether the probe rows' sums come from the kernel
    (backend="kernel") or from torch (backend="reference")."""
    q, k, _ = qkv(h=4, hk=2, n=320, d=16, seed=11)
    meta = SeqMeta(32, 32)
    got = PATTERNS.from_spec(f"{spec},backend=kernel").estimate(q, k, meta)
    want = PATTERNS.from_spec(f"{spec},backend=reference").estimate(q, k, meta)
    if spec.startswith("pbs"):
        assert torch.equal(got.perm, want.perm)
        got, want = got.blocks, want.blocks
    if spec.startswith("token_sparse"):
        assert torch.equal(got.count, want.count) and torch.equal(got.index, want.index)
    else:
        assert torch.equal(got.block_mask(), want.block_mask())


@pytest.mark.parametrize("nq,nk,causal,spec,chunk", [
    (320, 320, True, "vertical=20,slash=30,force_vertical=2,force_slash=8", "4096"),
    (320, 320, True, "vertical=20,slash=30,force_vertical=2,force_slash=8", "64"),  # five chunks of a row
    (300, 500, True, "vertical=50,slash=10,last_q=40,force_slash=4", "128"),  # more keys than queries
    (300, 500, False, "vertical=0,slash=10,last_q=40,force_slash=4", "64"),  # no verticals, not causal
    (2048, 2048, True, "vertical=6,slash=8,last_q=64,force_vertical=2,force_slash=4", "512"),  # sparse
])
def test_vertical_slash_layout_kernel_equals_torch(interpreter, monkeypatch, nq, nk, causal, spec, chunk):
    """``vs_layout``'s two kernels give exactly the layout of ``vertical_slash``'s torch selections and mask steps
    (``VIDSPARSE_VS_LAYOUT=0``) from the same probe-row sums: forced columns and offsets, more keys than queries,
    no verticals, non-causal, rows in registers and read in one or several chunks, and a sparse layout (under half
    the causal blocks)."""
    from vidsparse.attention.layout import causal_block_count

    monkeypatch.setenv("VIDSPARSE_VS_CHUNK", chunk)
    if chunk != "4096":  # rows read in chunks at every step; else the whole row stays in registers
        monkeypatch.setenv("VIDSPARSE_VS_RESIDENT", "0")
    q, k, _ = qkv(h=4, hk=2, n=nk, d=16, seed=nq)
    q = q[:, :, nk - nq:]
    meta = SeqMeta(32, 32, causal)
    pat = PATTERNS.from_spec(f"vertical_slash:{spec},backend=kernel")
    got = pat.estimate(q, k, meta)
    monkeypatch.setenv("VIDSPARSE_VS_LAYOUT", "0")
    want = pat.estimate(q, k, meta)
    assert torch.equal(got.kv_count, want.kv_count)
    assert torch.equal(got.kv_index, want.kv_index)
    assert torch.equal(got.kv_full, want.kv_full)
    if nq == 2048:
        assert int(want.kv_count.sum()) < 0.5 * 4 * causal_block_count(64, 64, 32, 32, nq, nk)


@pytest.mark.parametrize("resident", ["16384", "0"])
def test_vertical_slash_layout_kernel_breaks_ties_to_the_lower_index(interpreter, monkeypatch, resident):
    """Of tied sums (multiples of 1/4) the kernel keeps the lowest-indexed columns and offsets, exactly a stable
    descending sort's first k, and only positive ones; forced entries rank first: the layout equals
    ``lines_layout`` of those sets. Rows in registers, and read in four chunks."""
    from vidsparse.attention.kernels.vs_layout import vertical_slash_layout
    from vidsparse.attention.layout import causal_block_count
    from vidsparse.attention.patterns.vertical_slash import lines_layout

    monkeypatch.setenv("VIDSPARSE_VS_RESIDENT", resident)
    monkeypatch.setenv("VIDSPARSE_VS_CHUNK", "256")
    g = torch.Generator().manual_seed(4)
    nq = nk = 1000
    vert = torch.randint(0, 3, (2, 3, nk), generator=g).float() / 4  # zeros too: never kept
    slash = torch.randint(0, 3, (2, 3, nk), generator=g).float() / 4
    vert[0, 0] = 0.0  # rows with fewer positive sums than k: their zeros stay out
    vert[0, 0, 500] = 0.25
    slash[1, 2] = 0.0
    meta = SeqMeta(32, 32, True)

    def stable_top(x, kk, force):
        x = x.clone()
        x[..., :force] = float("inf")
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :kk]
        return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True) & (x > 0)

    index, count, full = vertical_slash_layout(vert, slash, 40, 70, 3, 5, 32, 32, nq, nk, True)
    want = lines_layout(stable_top(vert, 40, 3), stable_top(slash, 70, 5), meta, nq, nk)
    assert torch.equal(count, want.kv_count) and torch.equal(index, want.kv_index) and torch.equal(full, want.kv_full)
    assert int(count.sum()) < 0.9 * 6 * causal_block_count(32, 32, 32, 32, nq, nk)


def test_radial_density_falls_with_distance():
    q, k, _ = qkv(n=1024, d=16)
    lay = PATTERNS.from_spec("radial:sink=0").estimate(q, k, SeqMeta(32, 32, visual=(0, 1024), tokens_per_frame=32))
    bm = lay.block_mask()[0, 0]
    near = torch.stack([bm[m, m - 1 : m + 1].float().mean() for m in range(20, 32)]).mean()
    far = torch.stack([bm[m, : m - 16].float().mean() for m in range(20, 32)]).mean()
    assert near == 1.0 and far < 0.25


def test_power_pattern_blocks():
    q, k, _ = qkv(n=32 * 20, d=16)
    lay = PATTERNS.from_spec("power:local=1,sink=0").estimate(q, k, SeqMeta(32, 32))
    assert lay.kv_index[0, 0, 19, : lay.kv_count[0, 0, 19]].tolist() == [3, 11, 15, 17, 18, 19]


# --- the Triton kernel in interpreter mode --------------------------------------------------------------------------

@pytest.fixture
def interpreter():
    """The kernel on CPU tensors runs in Triton's interpreter; conftest sets TRITON_INTERPRET=1 before import."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before Triton is imported (conftest does so without CUDA)")


def _check(q, k, v, lay, **kw):
    ref = layout_attention(q.float(), k.float(), v.float(), lay, seqlens_q=kw.get("seqlens_q"), seqlens_k=kw.get("seqlens_k"))
    out = sparse_attention(q, k, v, lay, backend="kernel", **kw)
    same = layout_attention(q, k, v, lay, seqlens_q=kw.get("seqlens_q"), seqlens_k=kw.get("seqlens_k"), dtype=q.dtype) \
        if q.dtype != torch.float32 else ref
    err_k = (out.float() - ref).abs().max().item()
    err_t = (same.float() - ref).abs().max().item()
    assert kernel_ok(err_k, err_t, q.dtype), (err_k, err_t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,nk,causal", [(96, 96, True), (77, 77, True), (50, 90, True), (64, 40, False)])
def test_kernel_dense_and_random_layouts(interpreter, dtype, n, nk, causal):
    q, k, v = qkv(b=2, h=4, hk=2, n=n, nk=nk, d=16, dtype=dtype, seed=n)
    dense = BlockLayout.dense(n, nk, 32, 16, causal)
    _check(q, k, v, dense)
    mask = torch.rand(2, 4, -(-n // 32), -(-nk // 16), generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, 1] = False  # a head with no blocks: its rows are 0
    _check(q, k, v, BlockLayout.from_block_mask(mask, 32, 16, n, nk, causal))


@pytest.mark.parametrize("ramp", ["up", "down"])
def test_kernel_large_scores_keep_their_precision(interpreter, ramp):
    """Keys scaled up to 8× along the sequence (or down from 8×): scores of magnitude ~30, whose running max keeps
    growing (or never grows after the first block). The softmax scale is applied to the fp32 scores: folded into an
    fp16 Q it cost 1e-2 in log-sum-exp. Output against fp32 torch, log-sum-exp to LSE_ATOL."""
    from vidsparse.attention.kernels import block_sparse as bs

    n, d = 96, 16
    q, k, v = qkv(b=1, h=2, hk=1, n=n, d=d, dtype=torch.float32, seed=5)
    scale = torch.linspace(0.2, 8.0, n)
    k = k * (scale if ramp == "up" else scale.flip(0))[:, None] * 4  # × 4: the largest scores pass 20 (asserted)
    q, k, v = q.half(), k.half(), v.half()
    lay = BlockLayout.dense(n, n, 32, 16)
    _check(q, k, v, lay)
    _, lse = bs.block_sparse_attention(q, k, v, lay.kv_index, lay.kv_count, 32, 16, True, None, return_lse=True)
    assert (q[0].float() @ k[0].float().transpose(-1, -2)).max() / d ** 0.5 > 20  # the scores this test is about
    torch.testing.assert_close(lse[0], causal_lse(q[0], k[0]), atol=LSE_ATOL, rtol=0)


def test_kernel_equals_sdpa_on_all_blocks(interpreter):
    q, k, v = qkv(b=1, h=2, hk=1, n=80, d=32)
    out = sparse_attention(q, k, v, BlockLayout.dense(80, 80, 16, 16), backend="kernel")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, 80, 32), v.expand(1, 2, 80, 32),
                                                            is_causal=True)
    assert torch.allclose(out, sdpa, atol=1e-5)


def test_kernel_batch_with_different_lengths(interpreter):
    q, k, v = qkv(b=3, h=2, hk=2, n=70, d=16)
    lens = torch.tensor([70, 33, 1])
    out = _check(q, k, v, BlockLayout.dense(70, 70, 16, 16), seqlens_q=lens, seqlens_k=lens)
    assert torch.all(out[1, :, 33:] == 0) and torch.all(out[2, :, 1:] == 0)


def test_kernel_pattern_layouts(interpreter):
    q, k, v = qkv(b=1, h=4, hk=2, n=128, d=16, seed=9)
    for spec in ["sink_window:window=2", "block_topk:topk=2", "xattention:stride=4"]:
        lay = PATTERNS.from_spec(spec).estimate(q, k, SeqMeta(16, 16))
        _check(q, k, v, lay)


@pytest.mark.parametrize("dtype,d,hk,transposed", [(torch.float32, 16, 2, False), (torch.float16, 24, 4, True),
                                                    (torch.bfloat16, 64, 1, False)])
def test_own_key_fold_kernel_matches_oracle(interpreter, dtype, d, hk, transposed):
    """``fold_own_key`` against its fp32 oracle (``reference.fold_own_key``, the torch step it replaced in fp32): GQA
    and MHA, a head dim that is not a power of two, q and out as [B, N, H, D] transposed views (as transformers hands
    them over), rows that saw nothing (ℓ = −∞: the output becomes v_i). Rows whose key was kept are left bit-for-bit
    as they were; the others agree to one rounding of the output's dtype (fp32: FP32_SAME)."""
    from vidsparse.attention.kernels.own_key import fold_own_key
    from vidsparse.attention.reference import fold_own_key as oracle

    b, h, n = 2, 4, 45
    g = torch.Generator().manual_seed(d)
    q, out = (torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    if not transposed:
        q, out = q.contiguous(), out.contiguous()
    k, v = (torch.randn(b, hk, n, d, generator=g).to(dtype) for _ in range(2))
    lse = torch.randn(b, h, n, generator=g) * 3
    lse[1, 2, :7] = float("-inf")
    kept = torch.rand(n, generator=g) < 0.4
    kept[:3] = False
    scale = d ** -0.5
    want = oracle(q, k, v, out, lse, kept, scale)
    before = out.clone()
    got = fold_own_key(q, k, v, out, lse, kept, scale)
    assert got is out and got.dtype == dtype
    assert torch.equal(got[:, :, kept], before[:, :, kept])
    assert torch.equal(got[1, 2, :3], v[1, 2 // (h // hk), :3])  # saw nothing: exactly v_i
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    else:
        assert within_one_rounding(got, want, dtype)


@pytest.mark.parametrize("dtype,d,hk,transposed", [(torch.bfloat16, 24, 3, True), (torch.float16, 64, 2, False),
                                                    (torch.float32, 16, 1, False)])
def test_pool_kernel_matches_pool_levels(interpreter, dtype, d, hk, transposed):
    """The pyramid's one-pass pooling kernel against ``layout.pool_levels`` stacked (the torch step it replaced): keys
    as a [B, N, Hkv, D] transposed view, a head dim that is not a power of two, rows past the pooled ones ignored.
    Dyadic keys (k/64, |k| ≤ 16: every fp32 sum exact, every mean representable) give the same bits; random normal
    keys agree to one rounding of the dtype (the interpreter truncates fp32 to bf16 where the GPU rounds to nearest;
    fp32: FP32_SAME, torch sums in another order)."""
    from vidsparse.attention.kernels.block_sparse import pool_kv
    from vidsparse.attention.kernels.pool import pool_levels_stacked
    from vidsparse.attention.layout import pool_levels

    b, n, rows = 2, 200, 128
    g = torch.Generator().manual_seed(d)
    dyadic = torch.randint(-16, 17, (b, n, hk, d), generator=g).float() / 64
    normal = torch.randn(b, n, hk, d, generator=g)
    for x, exact in ((dyadic, True), (normal, False)):
        x = x.to(dtype).transpose(1, 2)
        x = x if transposed else x.contiguous()
        want = torch.cat(pool_levels(x, 2, 64), 2)
        got, offs = pool_levels_stacked(x, rows)
        assert offs == [0, 64, 96] and got.shape == want.shape == (b, hk, 112, d) and got.dtype == dtype
        if exact:
            assert torch.equal(got, want)
        elif dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
        else:
            assert within_one_rounding(got, want, dtype)
        assert torch.equal(pool_kv(x, 2, 64)[0], got)  # the kernels' pooled K/V come from it
    with pytest.raises(ValueError, match="multiple of"):
        pool_levels_stacked(x, 100)


@pytest.mark.parametrize("backend", ["reference", "torch", "kernel"])
@pytest.mark.parametrize("stride,causal", [(1, True), (4, True), (12, True), (4, False)])
def test_grid_group_execution_matches_mask(stride, causal, backend):
    """Span rows see the text before the span plus same-phase span tokens (causally, or all of them); other rows see
    everything (causally: everything before them)."""
    from vidsparse.attention.layout import GroupLayout
    from vidsparse.attention.reference import masked_attention

    g = torch.Generator().manual_seed(6)
    s, t, f = 7, 6, 12
    n = s + t * f + 9
    q, k, v = (torch.randn(1, h, n, 64, generator=g) for h in (4, 2, 2))
    meta = SeqMeta(causal=causal, visual=(s, s + t * f), tokens_per_frame=f, frame_hw=(3, 4))
    lay = PATTERNS.from_spec(f"grid:stride={stride}").estimate(q, k, meta)
    assert isinstance(lay, GroupLayout) and lay.causal == causal
    i = torch.arange(n)
    phase = (i - s) % stride
    in_span = (i >= s) & (i < s + t * f)
    same_phase = in_span[None, :] & (phase[None, :] == phase[:, None])
    expect = (i[None, :] <= i[:, None] if causal else True) & (~in_span[:, None] | ~in_span[None, :] & (i[None, :] < s)
                                                               | same_phase)
    assert torch.equal(lay.dense_mask()[0, 0], expect)
    out = sparse_attention(q, k, v, lay, backend=backend)
    torch.testing.assert_close(out, masked_attention(q, k, v, expect), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    assert (lay.density() < 1.0) == (stride > 1)


@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_grouped_attention_pads_each_head_to_its_own_groups(monkeypatch, backend):
    """Heads that split the span differently (dense, stride 4, stride 12; per batch entry) run in one batch per group
    count, so no group is padded to another head's longest (a dense head's whole span): the sequences gathered hold
    each head's span as queries and, as keys, the span plus one prefix per group. The output equals the mask's."""
    from vidsparse.attention import ops
    from vidsparse.attention.layout import GroupLayout
    from vidsparse.attention.reference import masked_attention

    g = torch.Generator().manual_seed(7)
    s, span = 5, 72
    n = s + span + 6
    q, k, v = (torch.randn(2, h, n, 32, generator=g) for h in (4, 2, 2))
    strides = torch.tensor([[1, 4, 12, 4], [12, 1, 1, 4]])
    lay = GroupLayout(torch.arange(span) % strides[..., None], (s, s + span), n, n)
    gathered = []
    real = ops._attend_gathered

    def spy(q_, k_, v_, qidx, kidx, *args):
        gathered.append((qidx.numel(), kidx.numel()))
        return real(q_, k_, v_, qidx, kidx, *args)

    monkeypatch.setattr(ops, "_attend_gathered", spy)
    out = sparse_attention(q, k, v, lay, backend=backend)
    torch.testing.assert_close(out, masked_attention(q, k, v, lay.dense_mask()), atol=FP32_SAME_ATOL,
                               rtol=FP32_SAME_RTOL)
    assert len(gathered) == 3  # group counts 1, 4 and 12
    # the groups are equal in size here, so nothing is padded: the queries are the span's tokens, each once (the
    # prefix is gathered as keys only), and the keys add one prefix per group
    assert sum(x[0] for x in gathered) == 8 * span
    assert sum(x[1] for x in gathered) == int((span + strides * s).sum())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_random_group_layouts_match_their_mask(backend):
    """Random GroupLayouts — batch 1 or 2, GQA or not, any span (empty text before it or none after it), sparse group
    ids (ids without members), groups shared over heads (an expanded tensor), causal or not — execute as their dense
    mask says, and their density is the mask's share counted as ``density_tensor`` documents."""
    from vidsparse.attention.layout import GroupLayout
    from vidsparse.attention.reference import masked_attention

    g = torch.Generator().manual_seed(0)
    ri = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    for trial in range(24):
        b, hk = ri(1, 3), ri(1, 3)
        h, n = hk * ri(1, 3), ri(20, 90)
        s = ri(0, 10)
        e = ri(s + 1, n + 1)
        causal = bool(trial % 2)
        grp = torch.randint(0, ri(1, e - s + 1), (b, h, e - s), generator=g)
        if trial % 3 == 0:
            grp = grp[:, :1].expand(b, h, e - s)
        lay = GroupLayout(grp, (s, e), n, n, causal)
        q, k, v = (torch.randn(b, x, n, 16, generator=g) for x in (h, hk, hk))
        mask = lay.dense_mask()
        torch.testing.assert_close(sparse_attention(q, k, v, lay, backend=backend), masked_attention(q, k, v, mask),
                                   atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL, msg=lambda m: f"trial {trial}: {m}")
        kept = (2 * mask.sum(-1) - 1).sum(-1) if causal else mask.sum((-2, -1))
        assert float(lay.density_tensor()) == pytest.approx(float(kept.float().mean()) / n ** 2, rel=1e-6)


def test_grid_finds_a_planted_stride_and_stays_dense_otherwise():
    g = torch.Generator().manual_seed(7)
    s, t, f = 5, 8, 12
    n = s + t * f + 6
    q, k = torch.randn(1, 4, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)
    meta = SeqMeta(visual=(s, s + t * f), tokens_per_frame=f, frame_hw=(3, 4))
    assert (PATTERNS.from_spec("grid").estimate(q, k, meta).num_groups == 1).all()  # no structure: dense
    emb = 4 * torch.randn(f, 64, generator=g)
    phase = torch.arange(t * f) % f
    q[0, :, s:s + t * f] = emb[phase]
    k[0, :, s:s + t * f] = emb[phase]
    assert (PATTERNS.from_spec("grid").estimate(q, k, meta).num_groups == f).all()
    with pytest.raises(Exception, match="tokens_per_frame"):
        PATTERNS.from_spec("grid").estimate(q, k, SeqMeta())


# --- pyramid (pooled K/V tiles) and pbs (permuted keys) ---------------------------------------------------------------

def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("backend", ["reference", "torch", "kernel"])
def test_pyramid_pooling_is_exact_on_repeated_keys(backend):
    """Keys and values constant over each run of 8: a pooled key with its ln p bias stands exactly for the p keys it
    averages, so pyramid at any level equals dense causal attention."""
    g = torch.Generator().manual_seed(11)
    n = 16 * 12 + 5  # ragged end: the last block stays exact
    q = torch.randn(1, 4, n, 32, generator=g)
    k, v = (torch.randn(1, 2, -(-n // 8), 32, generator=g).repeat_interleave(8, 2)[:, :, :n] for _ in range(2))
    dense = masked_attention(q, k, v, _causal(n))
    for spec in ["pyramid:exact=0,pool2=1,pool4=1,pool8=1,sink=0", "pyramid:exact=0,pool2=0,pool4=1,pool8=1,sink=0",
                 "pyramid:exact=0,pool2=0,pool4=0,pool8=1,sink=0"]:
        lay = PATTERNS.from_spec(spec).estimate(q, k, SeqMeta(16, 16))
        lv = lay.level_map()
        assert (lv > 1).any() and not (lv[..., _causal(13)] == 0).any()  # pooled somewhere, nothing skipped
        out = sparse_attention(q, k, v, lay, backend=backend)
        torch.testing.assert_close(out, dense, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
        assert lay.density() < 1.0


def test_pyramid_levels_follow_rank_bounds():
    q, k, _ = qkv(n=640, seed=4)
    p = PATTERNS.from_spec("pyramid:exact=0.1,pool2=0.3,pool4=0.5,pool8=0.7,sink=0,local=1")
    lv = p.levels(q, k, SeqMeta(32, 32))[0]  # [H, 20, 20]
    from vidsparse.attention.patterns.base import block_scores

    s = block_scores(q, k, SeqMeta(32, 32), stride=0)[0]  # the default: 8 tokens of each block
    for m in (12, 19):
        allowed = m + 1
        order = torch.argsort(s[0, m, :allowed], descending=True)
        want = torch.zeros(allowed, dtype=torch.long)
        for rank, j in enumerate(order.tolist()):
            f = rank / allowed
            want[j] = 1 if f < 0.1 else 2 if f < 0.3 else 4 if f < 0.5 else 8 if f < 0.7 else 0
        want[m] = 1  # the diagonal block is exact
        assert torch.equal(lv[0, m, :allowed], want)
        assert (lv[0, m, allowed:] == 0).all()


def test_pyramid_never_pools_across_the_diagonal():
    q, k, _ = qkv(n=333, seed=2)
    lay = PATTERNS.from_spec("pyramid:exact=0,pool2=0,pool4=0,pool8=1,sink=0").estimate(q, k, SeqMeta(32, 32))
    m, n = torch.arange(11)[:, None], torch.arange(11)[None, :]
    poolable = ((n + 1) * 32 <= 333) & ((n + 1) * 32 - 1 <= m * 32)  # whole key block, seen by the block's 1st query
    lv = lay.level_map()
    assert not ((lv > 1) & ~poolable).any() and (lv[..., poolable] > 1).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "kernel"])
def test_pbs_with_every_block_equals_dense(backend):
    """tau=1 keeps every past block: permuting keys and masking by original position is then exact attention."""
    q, k, v = qkv(n=300, seed=8)
    lay = PATTERNS.from_spec("pbs:segment=64,tau=1.0").estimate(q, k, SeqMeta(16, 16))
    out = sparse_attention(q, k, v, lay, backend=backend)
    torch.testing.assert_close(out, masked_attention(q, k, v, _causal(300)), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


def test_pbs_permutes_within_segments_by_score():
    q, k, v = qkv(n=300, seed=9)
    p = PATTERNS.from_spec("pbs:segment=64,tau=0.5,last_q=16")
    perm = p.permutation(q, k)
    from vidsparse.attention.patterns.base import row_probs

    score = row_probs(q[:, :, -16:], k, torch.arange(284, 300)).sum(2).view(1, 2, 2, 300).sum(2)
    for h in range(2):
        pm = perm[0, h]
        assert torch.equal(torch.sort(pm).values, torch.arange(300))
        assert torch.equal(pm // 64, torch.arange(300) // 64)  # each key stays in its segment
        sc = score[0, h, pm]
        for s0 in range(0, 300, 64):
            assert (sc[s0:s0 + 64][:-1] >= sc[s0:s0 + 64][1:]).all()  # best first
    lay = p.estimate(q, k, SeqMeta(16, 16))
    mask = lay.dense_mask(4)[0]
    assert not (mask & ~_causal(300)).any()  # never the future
    own = (torch.arange(300)[:, None] // 64 == torch.arange(300)[None, :] // 64) & _causal(300)
    assert (mask | ~own).all()  # the own segment is dense
    assert mask[:, :, 0].all()  # token 0 always seen
    assert lay.density() < 1.0
    torch.testing.assert_close(sparse_attention(q, k, v, lay, backend="reference"),
                               masked_attention(q, k, v, mask), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


@pytest.mark.parametrize("nk,segment", [(300, 64), (256, 64), (300, 1000), (300, 300), (50, 1), (1, 64)])
def test_segment_order_equals_sorting_all_then_by_segment(nk, segment):
    """pbs's per-segment sort gives exactly what sorting all Nk scores (descending, stable) and then stably by
    segment gives — the two sorts it replaced — with ties, zeros and a short last segment."""
    from vidsparse.attention.patterns.pbs import segment_order

    g = torch.Generator().manual_seed(nk + segment)
    score = torch.rand(2, 3, nk, generator=g)
    score[..., ::7] = 0.5  # ties inside and across segments
    score[..., 3::11] = 0.0
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    want = torch.gather(order, -1, torch.argsort(order // segment, dim=-1, stable=True))
    assert torch.equal(segment_order(score, segment), want)


@pytest.mark.parametrize("nk,segment", [(300, 64), (256, 64), (300, 1000), (300, 96), (50, 1), (1, 64)])
def test_segment_order_kernel_equals_torch(interpreter, nk, segment):
    """``kernels.gather.segment_order`` (one program per run, a bitonic sort of packed (score, position)) gives
    exactly pbs's torch order: ties (kept in position order), zeros and -0.0 (equal to 0.0), a short last run, runs
    that are not powers of two, one run longer than the keys."""
    from vidsparse.attention.kernels.gather import segment_order as kernel
    from vidsparse.attention.patterns.pbs import segment_order

    g = torch.Generator().manual_seed(nk + segment)
    score = torch.rand(2, 3, nk, generator=g)
    score[..., ::7] = 0.5
    score[..., 3::11] = 0.0
    score[..., 5::13] = -0.0
    assert torch.equal(kernel(score, segment), segment_order(score, segment))


def _rows_by_loop(x, index, heads=None):
    b, h, m = x.shape[0], index.shape[1], index.shape[2]
    heads = range(h) if heads is None else heads.tolist()
    out = torch.zeros(b, h, m, x.shape[-1], dtype=x.dtype)
    for bi in range(b):
        for hi, hx in enumerate(heads):
            for mi in range(m):
                out[bi, hi, mi] = x[bi, hx, index[min(bi, index.shape[0] - 1), hi, mi]]
    return out


def _row_copy(request, kernel: bool, name: str):
    """``kernels.gather``'s ``name`` under the interpreter, or ``layout``'s torch version of it."""
    if kernel:
        request.getfixturevalue("interpreter")
        from vidsparse.attention.kernels import gather

        return getattr(gather, name)
    from vidsparse.attention import layout

    return getattr(layout, f"{name}_torch")


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("d,dtype", [(16, torch.float32), (24, torch.float16), (64, torch.bfloat16)])
def test_gather_rows_equals_a_loop(request, kernel, d, dtype):
    """``gather_rows`` (torch) and ``kernels.gather`` (interpreter) copy exactly x[b, heads[h], index[b, h, m]]: a
    contiguous x, a [B, N, H, D] projection seen as [B, H, N, D] past a storage offset, query heads mapped onto
    K/V heads, an index shared over the batch (batch 1, expanded), flattened (batch, head) planes (``planes=``, a
    plane read twice, out of order) and a non-power-of-two head dim (24)."""
    fn = _row_copy(request, kernel, "gather_rows")
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 3, 40, d, generator=g).to(dtype)
    proj = torch.randn(2, 45, 3, d, generator=g).to(dtype)[:, 5:].transpose(1, 2)  # [2, 3, 40, d], not contiguous
    idx = torch.randint(0, 40, (2, 3, 70), generator=g)
    heads = torch.tensor([0, 0, 1, 1, 2, 2])
    idx6 = torch.randint(0, 40, (1, 6, 33), generator=g).expand(1, 6, 33)
    planes = torch.tensor([5, 0, 3, 2, 5])  # x's (batch, head) planes (1, 2), (0, 0), (1, 0), (0, 2), (1, 2)
    idxp = torch.randint(0, 40, (1, 5, 21), generator=g)
    for src in (x, proj):
        assert torch.equal(fn(src, idx), _rows_by_loop(src, idx))
        assert torch.equal(fn(src, idx6, heads), _rows_by_loop(src, idx6, heads))
        want = torch.stack([src[pl // 3, pl % 3, idxp[0, i]] for i, pl in enumerate(planes.tolist())])[None]
        assert torch.equal(fn(src, idxp, planes=planes), want)
    assert fn(x, idx[:, :, :0]).shape == (2, 3, 0, d)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("d,dtype", [(16, torch.float32), (24, torch.bfloat16)])
def test_scatter_rows_equals_a_loop(request, kernel, d, dtype):
    """``scatter_rows`` (torch) and ``kernels.gather.scatter_rows`` (interpreter) write exactly out[b, h, index] =
    src, and with ``planes=`` out[divmod(planes[p], H), index[0, p]] = src[0, p], into a [B, N, H, D] view, leaving
    every other row and every position outside [0, N) (padding) alone; a gather at the same positions reads the
    rows back."""
    from vidsparse.attention.layout import gather_rows_torch

    fn = _row_copy(request, kernel, "scatter_rows")
    g = torch.Generator().manual_seed(d)
    base = torch.randn(2, 40, 3, d, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(40, generator=g)[:25] for _ in range(6)]).view(2, 3, 25)
    idx[0, 1, 3] = -1
    idx[1, 2, 7] = 40  # padding: written nowhere
    src = torch.randn(2, 3, 25, d, generator=g).to(dtype)
    out = base.clone().transpose(1, 2)  # [2, 3, 40, d], not contiguous
    want = base.clone().transpose(1, 2)
    for bi in range(2):
        for hi in range(3):
            for mi in range(25):
                if 0 <= idx[bi, hi, mi] < 40:
                    want[bi, hi, idx[bi, hi, mi]] = src[bi, hi, mi]
    assert fn(out, idx, src) is out and torch.equal(out, want)
    ok = (idx >= 0) & (idx < 40)
    assert torch.equal(gather_rows_torch(out, idx.clamp(0, 39))[ok], src[ok])
    planes = torch.tensor([5, 0, 3])  # (batch, head) planes (1, 2), (0, 0), (1, 0)
    pidx = idx[:1]
    psrc = torch.randn(1, 3, 25, d, generator=g).to(dtype)
    out = base.clone().transpose(1, 2)
    want = base.clone().transpose(1, 2)
    for pi, pl in enumerate(planes.tolist()):
        for mi in range(25):
            if 0 <= pidx[0, pi, mi] < 40:
                want[pl // 3, pl % 3, pidx[0, pi, mi]] = psrc[0, pi, mi]
    assert torch.equal(fn(out, pidx, psrc, planes), want)


@pytest.mark.parametrize("dtype,block,m,transposed", [(torch.bfloat16, 32, 200, True), (torch.float16, 48, 144, False),
                                                      (torch.float32, 16, 64, False)])
def test_pool_rows_equals_pooling_the_gathered_rows(interpreter, dtype, block, m, transposed):
    """``kernels.gather.pool_rows`` (pbs's permuted keys' block means without their copy) against ``pool_blocks`` of
    ``gather_rows_torch``: a permutation within segments, a partial last block (200 = 6·32 + 8), a block that is not a
    power of two (48), a transposed view. Dyadic keys (x/64, |x| ≤ 16: every fp32 sum exact) give the same bits,
    random normal ones agree to fp32 summation order (FP32_SAME)."""
    from vidsparse.attention.kernels.gather import pool_rows
    from vidsparse.attention.layout import gather_rows_torch
    from vidsparse.attention.patterns.base import pool_blocks
    from vidsparse.attention.patterns.pbs import segment_order

    g = torch.Generator().manual_seed(block + m)
    perm = segment_order(torch.rand(2, 3, m, generator=g), 64)
    for exact in (True, False):
        raw = torch.randint(-16, 17, (2, m, 3, 24), generator=g).float() / 64 if exact else \
            torch.randn(2, m, 3, 24, generator=g)
        x = raw.to(dtype).transpose(1, 2)
        x = x if transposed else x.contiguous()
        got = pool_rows(x, perm, block)
        want = pool_blocks(gather_rows_torch(x, perm), block)
        assert got.dtype == torch.float32 and got.shape == want.shape == (2, 3, -(-m // block), 24)
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


def test_gather_rows_kernel_reads_zeros_outside_the_keys(interpreter):
    """A position outside [0, N) gives a zero row in the kernel (torch.gather would assert on the device); the
    other rows are untouched. Without heads=, the index must have x's heads."""
    from vidsparse.attention.kernels.gather import gather_rows

    x = torch.randn(1, 2, 10, 16) + 5.0
    idx = torch.tensor([[[0, -1, 9, 10], [3, 3, 100, 2]]])
    out = gather_rows(x, idx)
    assert torch.equal(out[0, 0, [0, 2]], x[0, 0, [0, 9]]) and torch.equal(out[0, 1, [0, 1, 3]], x[0, 1, [3, 3, 2]])
    assert (out[0, 0, [1, 3]] == 0).all() and (out[0, 1, 2] == 0).all()
    with pytest.raises(ValueError, match="heads="):
        gather_rows(x, idx.repeat(1, 2, 1))
    from vidsparse.attention.kernels.gather import scatter_rows

    for bad in (dict(index=idx.repeat(2, 1, 1), src=x[:, :, :4].repeat(2, 1, 1, 1), planes=torch.tensor([0, 1])),
                dict(index=idx, src=x[:, :, :4], planes=torch.tensor([0]))):
        with pytest.raises(ValueError, match="planes="):
            scatter_rows(x.clone(), **bad)
    with pytest.raises(ValueError, match="expected"):
        scatter_rows(x.clone(), idx, x[:, :, :3])
    for bad in (dict(index=idx.repeat(2, 1, 1), planes=torch.tensor([0, 1])),
                dict(index=idx, planes=torch.tensor([0, 1]), heads=torch.tensor([0, 1])),
                dict(index=idx, planes=torch.tensor([0, 1, 1]))):
        with pytest.raises(ValueError, match="planes="):
            gather_rows(x, **bad)


@pytest.mark.parametrize("d", [16, 24])
def test_gather_qkv_equals_three_gathers(interpreter, d):
    """``kernels.gather.gather_qkv`` (a token layout's q, k and v rows in one launch) copies exactly what
    ``gather_rows_torch`` does for each with its planes: batch 2 of model-layout (transposed) q, GQA planes for k/v,
    v of other strides than k, positions -1 and past N read as zeros, a head dim that is not a power of two; and it
    refuses k and v of different shapes."""
    from vidsparse.attention.kernels.gather import gather_qkv
    from vidsparse.attention.layout import gather_rows_torch

    g = torch.Generator().manual_seed(d)
    b, h, hk, n, m = 2, 4, 2, 50, 37
    q = torch.randn(b, n, h, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, hk, n, d, generator=g).to(torch.bfloat16)
    v = torch.randn(b, n, hk, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    pairs = torch.arange(b * h)
    kv_pairs = (pairs // h) * hk + (pairs % h) // (h // hk)
    idx = torch.randint(0, n, (1, b * h, m), generator=g)
    idx[0, 1, 3], idx[0, 5, 0] = -1, n  # outside the keys: zeros
    got = gather_qkv(q, k, v, idx, pairs, kv_pairs)
    ok = (idx >= 0) & (idx < n)
    for out, x, planes in zip(got, (q, k, v), (pairs, kv_pairs, kv_pairs)):
        want = gather_rows_torch(x, idx.clamp(0, n - 1), planes=planes)
        assert out.shape == (1, b * h, m, d) and out.is_contiguous()
        assert torch.equal(out[ok], want[ok]) and (out[~ok] == 0).all()
    with pytest.raises(ValueError, match="do not match"):
        gather_qkv(q, k, v[:, :, :40], idx, pairs, kv_pairs)


def test_kernel_key_positions_random_permutation(interpreter):
    """The kernel's causal mask by original key position, on a random key permutation with random blocks."""
    from vidsparse.attention.kernels.block_sparse import block_sparse_attention

    q, k, v = qkv(b=2, h=4, hk=2, n=90, d=16, seed=3)
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.stack([torch.randperm(90, generator=g) for _ in range(2)]) for _ in range(2)])
    mask = torch.rand(2, 4, 6, 6, generator=g) > 0.3
    lay = BlockLayout.from_block_mask(mask, 16, 16, 90, 90, causal=False)
    idx = perm[..., None].expand(-1, -1, -1, 16)
    out = block_sparse_attention(q, torch.gather(k, 2, idx), torch.gather(v, 2, idx), lay.kv_index, lay.kv_count,
                                 16, 16, True, None, key_pos=perm)
    from vidsparse.attention.layout import PermutedLayout

    ref = masked_attention(q, k, v, PermutedLayout(perm, lay).dense_mask(4))
    torch.testing.assert_close(out, ref, atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


def test_pattern_parameter_errors_are_spec_errors():
    """Out-of-range parameters fail when the spec is read, each naming its field: budgets ≤ 0 or above 1, masses
    outside (0, 1], negative counts. Values at the edges of the ranges are accepted."""
    from vidsparse.errors import SpecError, VidsparseError

    for spec in ["pbs:tau=0", "pbs:segment=0", "pyramid:mode=fast", "pyramid:exact=0.5,pool2=0.2"]:
        with pytest.raises(SpecError):
            PATTERNS.from_spec(spec)
    bad = {"block_topk:density=0": "density must be in (0, 1]", "block_topk:density=-1": "density",
           "block_topk:density=1.5": "density", "block_topk:topk=-3": "topk must be >= 0",
           "block_topk:sink=-1": "sink must be >= 0", "block_topk:local=-1": "local must be >= 0",
           "block_cdf:tau=0": "tau must be in (0, 1]", "block_cdf:tau=1.5": "tau", "block_cdf:min_cos=2": "min_cos",
           "power:local=-1": "local", "power:sink=-1": "sink", "radial:dense_frames=-1": "dense_frames",
           "sink_window:window=0": "window must be >= 1", "sink_window:sink=-1": "sink",
           "vertical_slash:vertical=-5": "vertical must be >= 0", "vertical_slash:last_q=0": "last_q must be >= 1",
           "vertical_slash:force_slash=-1": "force_slash", "xattention:stride=0": "stride must be >= 1",
           "xattention:tau=2": "tau", "xattention:chunk_tokens=0": "chunk_tokens", "pyramid:local=-1": "local",
           "grid:probe=0": "probe must be >= 1", "block_topk:pool_stride=-1": "pool_stride must be >= 0",
           "block_cdf:pool_stride=-1": "pool_stride", "pyramid:pool_stride=-2": "pool_stride",
           "token_sparse:coverage=0": "coverage", "pbs:last_q=0": "last_q"}
    for spec, words in bad.items():
        with pytest.raises(SpecError, match=re.escape(words)):
            PATTERNS.from_spec(spec)
    for spec in ["block_topk:density=1", "block_topk:topk=3,local=0,sink=0", "block_cdf:tau=1,min_cos=-1",
                 "sink_window:window=1,sink=0", "vertical_slash:vertical=0,slash=0,last_q=1", "xattention:tau=1",
                 "radial:dense_frames=0", "power:local=0"]:
        PATTERNS.from_spec(spec)
    q, k, _ = qkv(n=64)
    with pytest.raises(VidsparseError, match="segment=96"):
        PATTERNS.from_spec("pbs:segment=100").estimate(q, k, SeqMeta(32, 32))
    with pytest.raises(VidsparseError, match="stride"):
        PATTERNS.from_spec("xattention:stride=24").estimate(q, k, SeqMeta(32, 32))


def test_mixed_or_unsupported_dtypes_are_input_errors():
    from vidsparse.errors import InputError

    q, k, v = qkv(n=64)
    lay = BlockLayout.dense(64, 64)
    with pytest.raises(InputError, match="one dtype"):
        sparse_attention(q.half(), k, v, lay)
    with pytest.raises(InputError, match="float64"):
        sparse_attention(q.double(), k.double(), v.double(), lay)


def test_degenerate_inputs_are_clear_errors():
    """No tokens, wrong ranks, mismatched heads and bad block sizes: ``InputError`` before any indexing (every
    pattern's estimate checks q and k first); no queries is an empty output; a layout needs a key."""
    from vidsparse.errors import InputError

    q, k, v = qkv(n=64)
    for spec in ["block_topk", "pyramid", "sink_window", "vertical_slash", "xattention:stride=8"]:
        pat = PATTERNS.from_spec(spec)
        with pytest.raises(InputError, match="no tokens"):
            pat.estimate(q[:, :, :0], k[:, :, :0], SeqMeta(32, 32))
        with pytest.raises(InputError, match=re.escape("[B, H, N, D]")):
            pat.estimate(q[0], k[0], SeqMeta(32, 32))
        with pytest.raises(InputError, match="K/V heads dividing"):
            pat.estimate(q, torch.randn(1, 3, 64, 32), SeqMeta(32, 32))
    with pytest.raises(InputError, match="block sizes"):
        SeqMeta(0, 32)
    with pytest.raises(InputError, match="tokens_per_frame"):
        SeqMeta(tokens_per_frame=0)
    out = sparse_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], BlockLayout.dense(0, 0))
    assert out.shape == (1, 4, 0, 32)
    with pytest.raises(InputError, match="layout must be a BlockLayout"):
        sparse_attention(q, k, v, "block_topk")
    with pytest.raises(ValueError, match="at least one key"):
        BlockLayout.dense(10, 0)


@pytest.mark.parametrize("backend", ["kernel", "torch", "reference"])
def test_per_sequence_lengths_are_checked_and_clamped(backend):
    """``seqlens_*``: an integer tensor of one length per sequence (else an ``InputError``); a length past N
    computes what N does and one below 0 what 0 does (each kernel's wrapper clamps them, ``clamped_lengths``; the
    GPU file checks the Gluon kernel's)."""
    from vidsparse.errors import InputError

    q, k, v = qkv(b=2, n=200)
    lay = BlockLayout.dense(200, 200, 64, 64)
    run = lambda lens: sparse_attention(q, k, v, lay, seqlens_q=torch.tensor(lens),  # noqa: E731
                                        seqlens_k=torch.tensor(lens), backend=backend)
    assert torch.equal(run([500, 150]), run([200, 150]))
    assert torch.equal(run([-5, 150]), run([0, 150]))
    for bad in (torch.tensor([200]), torch.tensor([[200, 150]]), torch.tensor([200.0, 150.0]), [200, 150]):
        with pytest.raises(InputError, match="seqlens_q must be an integer tensor"):
            sparse_attention(q, k, v, lay, seqlens_q=bad, seqlens_k=torch.tensor([200, 150]), backend=backend)


@pytest.mark.parametrize("d,kernel", [(80, False), (96, False), (64, True)])
def test_auto_takes_the_torch_path_for_head_dims_the_kernel_lacks(monkeypatch, d, kernel):
    """Where the kernel runs ("auto" on a GPU, stood in for here by ``kernel_available``), a head dim it was not
    built for (Phi-3.5-vision's 96, 80) takes the torch path instead of failing inside the kernel; asked for by
    name it is an ``UnsupportedError``."""
    from vidsparse.attention import ops
    from vidsparse.attention.kernels import block_sparse
    from vidsparse.errors import UnsupportedError

    calls = []
    real = block_sparse.block_sparse_attention
    monkeypatch.setattr(ops, "kernel_available", lambda q: True)
    monkeypatch.setattr(block_sparse, "block_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = qkv(n=150, d=d)
    lay = BlockLayout.dense(150, 150, 64, 64)
    out = sparse_attention(q, k, v, lay)
    torch.testing.assert_close(out, layout_attention(q, k, v, lay), atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)
    assert bool(calls) == kernel
    if not kernel:
        with pytest.raises(UnsupportedError, match=f"not {d}"):
            sparse_attention(q, k, v, lay, backend="kernel")


def test_new_layouts_reject_per_sequence_lengths():
    q, k, v = qkv(n=64)
    lay = PATTERNS.from_spec("pbs:segment=32").estimate(q, k, SeqMeta(16, 16))
    with pytest.raises(Exception, match="per-sequence"):
        sparse_attention(q, k, v, lay, seqlens_q=torch.tensor([64]), backend="reference")


def test_cached_block_masks_serve_inference_and_autograd_callers():
    """The per-shape masks are cached; one first built under inference mode must still serve an autograd caller."""
    from vidsparse.attention.layout import full_block_mask
    from vidsparse.attention.patterns.base import forced_blocks

    causal_block_mask.cache_clear()
    full_block_mask.cache_clear()
    with torch.inference_mode():
        masks = [causal_block_mask(7, 9, 32, 32, 200, 280), full_block_mask(7, 9, 32, 32, 200, 280, True),
                 forced_blocks(7, 9, SeqMeta(32, 32), 200, 280, 1, 2, None)]
    x = torch.randn(7, 9, requires_grad=True)
    sum(torch.where(m, x, 0.0).sum() for m in masks).backward()
    assert torch.equal(x.grad, sum(m.float() for m in masks))
    assert causal_block_mask(7, 9, 32, 32, 200, 280) is masks[0]  # served from the cache


def test_static_patterns_build_once_per_shape():
    """Static patterns (shapes only) build their layout once per settings, metadata, lengths and device; the
    others estimate on every call."""
    q, k, _ = qkv(h=2, hk=1, n=300, d=16, seed=1)
    meta = SeqMeta(32, 32)
    a, b = PATTERNS.from_spec("sink_window:window=2"), PATTERNS.from_spec("sink_window:window=3")
    first = a.layout(q, k, meta)
    assert a.layout(q, k, meta) is first
    assert torch.equal(first.block_mask(), a.estimate(q, k, meta).block_mask())
    other = b.layout(q, k, meta)  # other settings: another layout
    assert other is not first and other.kv_count.sum() > first.kv_count.sum()
    shorter = a.layout(q[:, :, :200], k[:, :, :200], meta)  # other lengths: another layout
    assert shorter.num_q_blocks == 7 and first.num_q_blocks == 10
    assert a.layout(q, k, SeqMeta(32, 32, causal=False)) is not first
    topk = PATTERNS.from_spec("block_topk")
    assert topk.layout(q, k, meta) is not topk.layout(q, k, meta)
