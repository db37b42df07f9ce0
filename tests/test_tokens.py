"""Token reducers: the shared contract for every reducer, on LLaVA-OneVision and Qwen2.5-VL layouts, plus
hand-computed cases per method."""


import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidsparse import TOKENS
from vidsparse.errors import InputError
from vidsparse.types import VisualTokens

ALL = TOKENS.names()


def make(hw, d=16, seed=0, attention=False, keys=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in hw)
    base = torch.randn(n, d, generator=g)
    # Temporal redundancy: each frame repeats part of the previous one where grids agree.
    feats = base.clone()
    start = 0
    prev = None
    for h, w in hw:
        if prev is not None and prev[1] == (h, w):
            same = torch.rand(h * w, generator=g) < 0.6
            feats[start : start + h * w][same] = feats[prev[0] : prev[0] + h * w][same] + 0.01 * base[start : start + h * w][same]
        prev = (start, (h, w))
        start += h * w
    att = torch.rand(n, generator=g) if attention else None
    k = torch.randn(n, 8, generator=g) if keys else None
    return VisualTokens.from_grid(feats.to(dtype), hw, attention=att, keys=k)


LAYOUTS = {
    "llava_ov": [(27, 27)] * 6,  # SigLIP 27x27, no CLS
    "qwen": [(9, 16)] * 3 + [(12, 12)] * 2 + [(7, 11)],  # merged grids, resolution changing between frames
    "tiny": [(2, 3)] * 5,
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("frac", [0.01, 0.1, 0.26, 0.5, 0.9, 0.999])
def test_contract(name, layout, frac):
    vt = make(LAYOUTS[layout], attention=True, keys=True)
    n = len(vt)
    budget = max(1, int(n * frac))
    r = TOKENS.from_spec(name).reduce(vt, budget)
    assert len(r) == budget and r.features.shape == (budget, vt.features.shape[1])
    assert bool((r.keep_index[1:] > r.keep_index[:-1]).all())
    assert torch.equal(r.positions, vt.positions[r.keep_index])
    again = TOKENS.from_spec(name).reduce(vt, budget)
    assert torch.equal(again.keep_index, r.keep_index) and torch.equal(again.features, r.features)
    assert torch.isfinite(r.features).all()


@pytest.mark.parametrize("name", ALL)
def test_identity_at_full_budget(name):
    vt = make(LAYOUTS["qwen"], dtype=torch.bfloat16)
    for budget in (len(vt), len(vt) + 7):
        r = TOKENS.from_spec(name).reduce(vt, budget)
        assert r.features is vt.features  # bit for bit: the very tensor
        assert torch.equal(r.keep_index, torch.arange(len(vt)))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_bad_budget(name, budget):
    with pytest.raises(InputError):
        TOKENS.from_spec(name).reduce(make(LAYOUTS["tiny"]), budget)


@pytest.mark.parametrize("name", ALL)
def test_fallback_without_attention_or_keys(name):
    vt = make(LAYOUTS["llava_ov"])
    assert len(TOKENS.from_spec(name).reduce(vt, 500)) == 500


@settings(max_examples=25, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=6),
       frac=st.floats(0.0, 1.0), name=st.sampled_from(ALL), seed=st.integers(0, 10**6))
def test_contract_random_shapes(frames, frac, name, seed):
    vt = make(frames, d=8, seed=seed, attention=seed % 2 == 0)
    budget = max(1, int(len(vt) * frac))
    r = TOKENS.from_spec(name).reduce(vt, budget)
    assert len(r) == min(budget, len(vt))
    assert len(set(r.keep_index.tolist())) == len(r)


# --- hand-computed cases -------------------------------------------------------------------------------------------

def test_pooling_means_at_top_left():
    x = torch.arange(16.0)[:, None].repeat(1, 2)
    vt = VisualTokens.from_grid(x, [(4, 4)])
    r = TOKENS.from_spec("pooling").reduce(vt, 4)
    assert r.keep_index.tolist() == [0, 2, 8, 10]
    assert r.features[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_pooling_unpools_evenly_between_windows_and_tokens():
    x = torch.arange(16.0)[:, None]
    vt = VisualTokens.from_grid(x, [(4, 4)])
    r = TOKENS.from_spec("pooling").reduce(vt, 6)  # 4 windows + 2 extra tokens
    # Total mass is preserved: every token is either kept alone or averaged into exactly one kept mean.
    wid = (vt.positions[:, 1] // 2) * 2 + vt.positions[:, 2] // 2
    assert len(r) == 6
    kept_w = wid[r.keep_index]
    assert sorted(set(kept_w.tolist())) == [0, 1, 2, 3]


def test_evs_keeps_first_frame_and_changes():
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[[1, 4]] = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    vt = VisualTokens.from_grid(torch.cat([a, b, b]), [(2, 3)] * 3)
    r = TOKENS.from_spec("evs").reduce(vt, 8)
    assert r.keep_index.tolist() == [0, 1, 2, 3, 4, 5, 7, 10]  # frame 0 whole, then the two changed tokens
    from vidsparse.tokens.evs import evs_budget

    assert evs_budget(10, 20, 0.9) == 20  # vLLM's int() truncation gave 19
    assert evs_budget(2, 10, 0.99) == 10


def test_visionzip_merge_matches_reference_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g)
    att = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8, 0.4, 0.0, 0.5, 0.6])
    vt = VisualTokens.from_grid(x, [(3, 3)], attention=att)
    r = TOKENS.from_spec("visionzip:dominant=2,contextual=1").reduce(vt, 3)
    # Budget 3 -> 1 contextual (3·1/3) + 2 dominant: tokens 0 and 4 by attention.
    rest = [1, 2, 3, 5, 6, 7, 8]
    target = rest[0]
    others = rest[1:]
    expect = x[target] + x[others].mean(0)  # one target: every other token joins it
    assert r.keep_index.tolist() == [0, 1, 4]
    assert torch.allclose(r.features[1], expect, atol=1e-6)
    assert torch.equal(r.features[0], x[0]) and torch.equal(r.features[2], x[4])


def test_ktv_tokens_score_formula():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=g)
    att = torch.rand(12, generator=g)
    vt = VisualTokens.from_grid(x, [(3, 4)], attention=att)
    r = TOKENS.from_spec("ktv_tokens:alpha=0.2").reduce(vt, 5)
    f = torch.nn.functional.normalize(x, dim=-1)
    cos = f @ f.T
    mean_cos = (cos.sum(1) - 1) / 11
    mm = lambda v: (v - v.min()) / (v.max() - v.min())
    score = 0.2 * mm(att) + 0.8 * (1 - mm(mean_cos))
    assert r.keep_index.tolist() == sorted(torch.argsort(-score)[:5].tolist())


def test_dycoke_reference_frames():
    from vidsparse.tokens.dycoke import dycoke_budget, references

    vt = make([(1, 2)] * 8)
    ref = references(vt)
    frame_of = lambda i: int(vt.frame[i]) if i >= 0 else -1
    refs = [frame_of(int(ref[2 * f])) for f in range(8)]
    assert refs == [-1, 0, 0, 2, -1, 4, 4, 6]  # frame 6 is compared (the reference skipped it)
    assert dycoke_budget([10] * 5) == 10 + 3 + 3 + 3 + 10
    vt3 = make([(2, 2)] * 3)  # fewer than 4 frames work
    assert len(TOKENS.from_spec("dycoke").reduce(vt3, 7)) == 7


def test_dycoke_prunes_redundant_tokens_first():
    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[0] = -a[0]  # the only changed token of frame 1
    vt = VisualTokens.from_grid(torch.cat([a, b]), [(2, 2)] * 2)
    r = TOKENS.from_spec("dycoke").reduce(vt, 5)
    assert r.keep_index.tolist() == [0, 1, 2, 3, 4]


def test_ts_llava_uniform_pick_and_grid():
    from vidsparse.tokens.ts_llava import grid_shape, uniform_pick

    assert uniform_pick(10, 6).tolist() == [0, 2, 4, 5, 7, 9]
    assert grid_shape(6) == (2, 3) and grid_shape(7) == (3, 3) and grid_shape(97)[0] * grid_shape(97)[1] >= 97
    vt = make([(6, 6)] * 10)
    r = TOKENS.from_spec("ts_llava").reduce(vt, 60)
    # Pooled thumbnail cells (features changed by pooling) come from the six uniformly chosen frames only.
    pooled = ~torch.isclose(r.features, vt.features[r.keep_index]).all(1)
    assert set(vt.frame[r.keep_index[pooled]].tolist()) == {0, 2, 4, 5, 7, 9}
    assert 6 <= int(pooled.sum()) <= 30


def test_dcode_tokens_leaders_and_merge():
    base = torch.tensor([[1.0, 0, 0, 0], [0.99, 0.1, 0, 0], [0.98, 0.12, 0, 0], [0, 0, 1.0, 0], [0, 0.1, 0, 0.2]])
    x = base * torch.tensor([[3.0], [2.9], [2.8], [2.0], [1.0]])  # norms: 3 > 2.9 > 2.8 > 2 > ~0.22
    vt = VisualTokens.from_grid(torch.cat([x, torch.zeros(1, 4) + 0.01]), [(2, 3)])
    r = TOKENS.from_spec("dcode_tokens:oversample=2").reduce(vt, 2)
    assert r.keep_index.tolist() == [0, 3]  # token 0 leads, 1 and 2 join it (cos >= 0.8), token 3 leads
    assert torch.allclose(r.features[0], x[:3].mean(0))
    assert torch.equal(r.features[1], x[3])


def test_dpc_knn_is_deterministic_on_ties():
    from vidsparse.tokens.base import dpc_knn

    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    rho, delta = dpc_knn(x, 1)
    assert torch.equal(rho, dpc_knn(x, 1)[0])
    assert delta[0] == 3.0  # densest by index among equals: its δ is the largest distance


def test_prunevid_static_video_collapses_to_one_frame():
    f = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    vt = VisualTokens.from_grid(f.repeat(5, 1), [(2, 2)] * 5)
    r = TOKENS.from_spec("prunevid").reduce(vt, 4)
    assert r.keep_index.tolist() == [0, 1, 2, 3]
    assert torch.allclose(r.features, f, atol=1e-6)


def test_prunevid_segments_follow_content():
    from vidsparse.tokens.prunevid import temporal_segments

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 8, generator=g) * 5, torch.randn(1, 8, generator=g) * 5
    frames = [a + 0.01 * torch.randn(4, 8, generator=g) for _ in range(4)] + \
             [b + 0.01 * torch.randn(4, 8, generator=g) for _ in range(4)]
    vt = VisualTokens.from_grid(torch.cat(frames), [(2, 2)] * 8)
    assert temporal_segments(vt, 0.25, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_fastvid_segments_and_anchor_weight():
    from vidsparse.tokens.fastvid import fastvid_segments

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    frames = [a + 0.01 * torch.randn(4, 8, generator=g) for _ in range(3)] + \
             [b + 0.01 * torch.randn(4, 8, generator=g) for _ in range(3)]
    vt = VisualTokens.from_grid(torch.cat(frames), [(2, 2)] * 6)
    assert fastvid_segments(vt, cuts=1, tau=0.5).tolist() == [0, 0, 0, 1, 1, 1]
    from vidsparse.tokens.base import merge_into

    f = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    out = merge_into(f, torch.tensor([1, 2, 3]), torch.tensor([0]), torch.tensor([0, 0, 0]), 1,
                     self_weight=torch.tensor([max(1 / 4, 0.6)]))
    assert out.item() == pytest.approx(0.6 * 1 + 0.4 * 5)


def test_sinkhorn_matches_pot():
    ot = pytest.importorskip("ot")
    from vidsparse.tokens.aot import sinkhorn

    g = torch.Generator().manual_seed(0)
    for m, k in [(5, 3), (12, 7), (30, 4)]:
        cost = torch.rand(m, k, generator=g, dtype=torch.float64)
        ours = sinkhorn(cost[None].float(), eps=0.1, iters=1000, tol=1e-7)[0].double()
        ref = ot.sinkhorn(torch.full((m,), 1 / m, dtype=torch.float64).numpy(), torch.full((k,), 1 / k, dtype=torch.float64).numpy(),
                          cost.numpy(), reg=0.1, numItermax=10000, stopThr=1e-12)
        assert torch.allclose(ours, torch.from_numpy(ref), atol=1e-6, rtol=1e-3)


def test_sinkhorn_batched_with_padding_equals_unpadded():
    from vidsparse.tokens.aot import sinkhorn

    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 4, 3, generator=g)
    big = torch.rand(1, 6, 5, generator=g)
    big[:, :4, :3] = a
    mask = torch.zeros(1, 6, 5, dtype=torch.bool)
    mask[:, :4, :3] = True
    padded = sinkhorn(big, mask=mask, tol=1e-9, iters=500)
    assert torch.allclose(padded[:, :4, :3], sinkhorn(a, tol=1e-9, iters=500), atol=1e-6)
    assert float(padded[~mask].abs().max()) == 0.0


def test_aot_local_maxima_and_duplicate_frames_merge():
    from vidsparse.tokens.aot import local_maxima

    s = torch.zeros(25)
    s[6], s[18] = 1.0, 2.0
    vt = VisualTokens.from_grid(torch.randn(25, 4), [(5, 5)])
    assert torch.nonzero(local_maxima(s, vt, 3)).flatten().tolist() == [6, 18]
    # Four identical frames: the inter-frame stage removes copies of the first frame's anchors.
    f = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    vt4 = VisualTokens.from_grid(f.repeat(4, 1), [(4, 4)] * 4)
    r = TOKENS.from_spec("aot").reduce(vt4, 12)
    assert len(r) == 12 and int((r.frame == 0).sum()) >= 4


def _greedy_reference(x, k, threshold=0.8, oversample=2.0):
    """Sequential D-CoDe-style greedy on one frame, written plainly: the oracle for the parallel version."""
    norm = x.norm(dim=1)
    m = min(len(x), int(math.ceil(k * oversample)))
    cand = sorted(range(len(x)), key=lambda i: (-float(norm[i]), i))[:m]
    f = torch.nn.functional.normalize(x, dim=1)
    leaders = []
    for c in cand:
        if len(leaders) >= k:
            break
        if not any(float(f[c] @ f[l]) >= threshold for l in leaders):
            leaders.append(c)
    return sorted(leaders)


@pytest.mark.parametrize("seed", range(6))
def test_dcode_tokens_parallel_greedy_equals_sequential(seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 8, generator=g)
    x = centres[torch.randint(0, 5, (40,), generator=g)] + 0.3 * torch.randn(40, 8, generator=g)
    x *= torch.rand(40, 1, generator=g) + 0.5
    vt = VisualTokens.from_grid(x, [(5, 8)])
    k = 6
    r = TOKENS.from_spec("dcode_tokens").reduce(vt, k)
    ref = _greedy_reference(x, k)
    # The parallel rounds pick the same leaders; frames short of leaders are topped up by norm, so compare leaders.
    assert set(ref) <= set(r.keep_index.tolist())


def test_prunevid_memory_chunks_do_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    vt = VisualTokens.from_grid(torch.randn(16 * 50, 8, generator=g), [(5, 10)] * 16)
    a = TOKENS.from_spec("prunevid").reduce(vt, 200)
    b = TOKENS.from_spec("prunevid:max_pairs=3000").reduce(vt, 200)  # forces one segment per batch
    assert torch.equal(a.keep_index, b.keep_index) and torch.allclose(a.features, b.features)
