
import numpy as np
import pytest

from vidsparse import FRAMES, Budget
from vidsparse.errors import InputError
from vidsparse.frames.base import allocate_tokens, fill_unique, uniform_indices
from vidsparse.scoring import CandidateScores


def relevance(index, gt):
    """Ground-truth relevance with a little texture: 1 inside needle captions, small noise elsewhere."""
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 0.1, len(index))
    for e in gt.needle_events:
        s[(index.times >= e.start) & (index.times < e.end)] = 0.9 + rng.uniform(0, 0.1)
    return s


ALL = sorted(FRAMES.names())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_contract(name, n, synth, synth_index):
    """Exactly n sorted unique candidates, positive tokens, deterministic, under every budget."""
    sel_cls = FRAMES.get(name)
    scores = relevance(synth_index, synth[1]) if sel_cls.capabilities.get("query") == "required" else None
    a = FRAMES.from_spec(name).select(synth_index, Budget(frames=n), scores)
    b = FRAMES.from_spec(name).select(synth_index, Budget(frames=n), scores)
    assert len(a) == n
    assert np.all(np.diff(a.index) > 0)
    assert np.array_equal(a.times, synth_index.times[a.index])
    assert np.all(a.tokens > 0)
    assert np.array_equal(a.index, b.index) and np.array_equal(a.tokens, b.tokens)
    assert a.method == name


@pytest.mark.parametrize("name", ALL)
def test_budget_larger_than_candidates_clamps_with_warning(name, synth, synth_index):
    sel_cls = FRAMES.get(name)
    scores = relevance(synth_index, synth[1]) if sel_cls.capabilities.get("query") == "required" else None
    with pytest.warns(UserWarning, match="exceeds"):
        sel = FRAMES.from_spec(name).select(synth_index, Budget(frames=10_000), scores)
    assert np.array_equal(sel.index, np.arange(len(synth_index)))
    assert any("exceeds" in n for n in sel.notes)


@pytest.mark.parametrize("name", [n for n in ALL if FRAMES.get(n).capabilities.get("query") == "required"])
def test_query_required(name, synth_index):
    with pytest.raises(InputError, match="needs a query"):
        FRAMES.from_spec(name).select(synth_index, Budget(frames=4), None)


@pytest.mark.parametrize("name", ["bolt", "aks", "tstar", "f2c", "qframe"])
def test_query_aware_selectors_find_the_needles(name, synth, synth_index):
    gt = synth[1]
    sel = FRAMES.from_spec(name).select(synth_index, Budget(frames=8), relevance(synth_index, gt))
    for e in gt.needle_events:
        assert any(e.contains(t) for t in sel.times), (name, e, sel.times)


def test_uniform_is_rounded_linspace():
    for t, n in [(10, 6), (100, 7), (5, 5), (3600, 64)]:
        assert np.array_equal(uniform_indices(t, n), np.round(np.linspace(0, t - 1, n)).astype(int))


def test_fill_unique_refills_in_priority_order():
    assert fill_unique([3, 3, 5], 4, 10, priority=[5, 9, 3, 0]).tolist() == [3, 5, 9, 0]
    assert len(fill_unique([0, 0, 0], 3, 3)) == 3


def test_allocate_tokens_ktv_example_and_bounds():
    assert allocate_tokens([4, 2, 2, 2, 2, 1], 1872).tolist() == [576, 288, 288, 288, 288, 144]
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 20))
        total = int(rng.integers(n, 20000))
        lo = int(rng.integers(1, 64))
        hi = int(rng.integers(lo, 900))
        a = allocate_tokens(rng.random(n) ** 3, total, lo, hi)
        assert a.sum() <= total
        if lo * n <= total:
            assert a.min() >= lo and a.max() <= hi
        if lo * n <= total <= hi * n:
            assert a.sum() == total
    with pytest.raises(InputError):
        allocate_tokens([1, 1, 1], 2)


def _fixed_index(t):
    """A minimal index stand-in: selectors that only read scores need times and a length."""
    from vidsparse.video.index import VideoIndex
    from vidsparse.video.probe import Packets
    from vidsparse.types import VideoInfo

    info = VideoInfo("x", float(t), 1.0, 64, 64, "h264", False, 0.0, t)
    pk = Packets(np.arange(t, dtype=float), np.arange(t) % 10 == 0, np.full(t, 1000), np.ones(t))
    return VideoIndex(info, pk, np.arange(t, dtype=float), np.zeros((t, 64, 64, 3), np.uint8), 1.0)


def test_bolt_reference_defects_fixed():
    idx = _fixed_index(20)
    s = np.linspace(0, 1, 20)
    one = FRAMES.from_spec("bolt").select(idx, Budget(frames=1), s)
    assert one.index.tolist() and 0 <= one.index[0] < 20  # the reference returned T
    two = FRAMES.from_spec("bolt").select(idx, Budget(frames=2), s)
    assert len(set(two.index.tolist())) == 2  # the reference always duplicated
    peaked = np.zeros(20)
    peaked[7] = 1.0
    sel = FRAMES.from_spec("bolt").select(idx, Budget(frames=5), peaked + np.arange(20) * 1e-3)
    assert 7 in sel.index and len(sel) == 5


def test_bolt_matches_inverse_transform_formula():
    idx = _fixed_index(50)
    s = np.random.default_rng(4).random(50)
    sel = FRAMES.from_spec("bolt:power=3").select(idx, Budget(frames=6), s)
    w = ((s - s.min()) / (s - s.min()).max()) ** 3
    expect = np.searchsorted(np.cumsum(w / w.sum()), np.linspace(1 / 6, 1 - 1 / 6, 6))
    if len(set(expect)) == 6:
        assert sel.index.tolist() == sorted(expect.tolist())


def test_aks_small_budget_returns_exactly_m():
    idx = _fixed_index(256)
    s = np.random.default_rng(5).random(256)
    for m in (1, 3, 8, 31):
        assert len(FRAMES.from_spec("aks").select(idx, Budget(frames=m), s)) == m


def test_aks_leaf_rule():
    aks = FRAMES.from_spec("aks:t1=0.3,max_depth=2")
    s = np.zeros(16)
    s[2] = 1.0  # one sharp peak in the left half
    leaves = aks.leaves(s, 2)
    assert leaves[0] == (0, 16, 0) or all(d <= 2 for _, _, d in leaves)
    sel = FRAMES.from_spec("aks:t1=0.3,max_depth=2").select(_fixed_index(16), Budget(frames=2), s)
    assert 2 in sel.index


def test_ktv_ranks_tokens_by_query(synth_index):
    idx = synth_index
    s = np.zeros(len(idx))
    sel0 = FRAMES.from_spec("ktv").select(idx, Budget(frames=6))
    s[sel0.index[3]] = 1.0  # make one keyframe the most relevant
    sel = FRAMES.from_spec("ktv").select(idx, Budget(frames=6, tokens=1872), s)
    assert np.array_equal(sel.index, sel0.index)  # the query only ranks, never changes the keyframes
    assert sel.tokens[3] == 576 and sorted(sel.tokens.tolist()) == [144, 288, 288, 288, 288, 576]


def test_ktv_keyframes_cover_scenes(synth, synth_index):
    """Clustering picks frames from distinct scenes: more distinct scenes than uniform gets at equal budget."""
    gt = synth[1]
    starts = np.asarray(gt.scene_starts)
    scene_of = lambda ts: {int(np.searchsorted(starts, t, side="right")) for t in ts}
    n = 8
    ktv = FRAMES.from_spec("ktv").select(synth_index, Budget(frames=n))
    assert len(scene_of(ktv.times)) >= 6


def test_dcode_adds_novel_frames(synth_index):
    sel = FRAMES.from_spec("dcode:uniform_ratio=0.5").select(synth_index, Budget(frames=10))
    base = uniform_indices(len(synth_index), 5)
    assert set(base) <= set(sel.index.tolist())
    zero = FRAMES.from_spec("dcode:uniform_ratio=0").select(synth_index, Budget(frames=4))
    assert len(zero) == 4


def test_slowfast_budget_rule():
    from vidsparse.frames.slowfast import slow_tokens

    s = slow_tokens(3, 5, 2000)
    assert 3 * s + 5 * max(int(0.3 * s), 48) <= 2000 < 3 * (s + 1) + 5 * max(int(0.3 * (s + 1)), 48)
    assert slow_tokens(1, 0, 10**6) == 768 and slow_tokens(10, 10, 10) == 48


def test_slowfast_static_frames_are_fast(tmp_path):
    from vidsparse.frames.slowfast import classify_slow

    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert classify_slow(np.stack([a, a, a, b, b])).tolist() == [True, False, False, True, False]


def test_kffocus_novelty_peaks_at_cuts(synth, synth_index):
    from vidsparse.frames.kffocus import novelty

    nov = novelty(synth_index)
    cut_slots = [int(np.searchsorted(synth_index.times, c, side="right") - 1) for c in synth[1].scene_starts[1:]]
    assert np.mean(nov[cut_slots]) > 2 * np.mean(nov)


def test_scenes_agree_with_scenedetect(synth_index):
    """The same thumbnails through scenedetect's ContentDetector (SUPPRESS filter) give the same cuts."""
    from scenedetect import FrameTimecode
    from scenedetect.detectors import ContentDetector
    from scenedetect.detector import FlashFilter

    from vidsparse.frames.scenes import hsv_scores, scene_cuts

    for threshold, min_len in [(27.0, 2), (10.0, 3), (5.0, 1)]:
        det = ContentDetector(threshold=threshold, min_scene_len=min_len, filter_mode=FlashFilter.Mode.SUPPRESS)
        cuts = []
        for i, f in enumerate(synth_index.thumbs):
            cuts += [c.frame_num for c in det.process_frame(FrameTimecode(i, fps=1.0), np.ascontiguousarray(f[..., ::-1]))]
        ours = scene_cuts(hsv_scores(synth_index.thumbs), synth_index.times, threshold, float(min_len))
        assert ours.tolist() == cuts, threshold


def test_scenes_find_the_synthetic_cuts(synth, synth_index):
    from vidsparse.frames.scenes import hsv_scores, scene_cuts

    cuts = synth_index.times[scene_cuts(hsv_scores(synth_index.thumbs), synth_index.times, 27.0, 2.0)]
    truth = np.ceil(np.asarray(synth[1].scene_starts[1:]))  # the first candidate showing the new scene
    # Every detected cut is a true one (within a candidate); random scene colours can make a rare cut too subtle.
    assert all(np.min(np.abs(truth - c)) <= 1.0 for c in cuts)
    assert len(cuts) >= 0.8 * len(truth)
    adaptive = FRAMES.from_spec("scenes:adaptive=true").scenes(synth_index)
    assert abs(len(adaptive) - len(truth) - 1) <= 2


def test_scenes_one_per_scene_spread_by_length(synth, synth_index):
    sc = FRAMES.from_spec("scenes")
    spans = sc.scenes(synth_index)
    sel = sc.select(synth_index, Budget(frames=len(spans)))
    owner = [next(k for k, (a, b) in enumerate(spans) if a <= i < b) for i in sel.index]
    assert sorted(owner) == list(range(len(spans)))


def test_f2c_forms_clips_and_fits_tokens(synth, synth_index):
    s = relevance(synth_index, synth[1])
    sel = FRAMES.from_spec("f2c:anchors=2").select(synth_index, Budget(frames=10, tokens=10 * 120), s)
    assert len(sel) == 10 and 1 <= len(sel.clips) <= 2
    assert sel.tokens.sum() <= 1200
    for a, b in sel.clips:
        assert any(e.start - 5 <= a and b <= e.end + 5 for e in synth[1].needle_events)


def test_qframe_tiers_and_seed(synth, synth_index):
    s = relevance(synth_index, synth[1])
    sel = FRAMES.from_spec("qframe").select(synth_index, Budget(frames=9, tokens=9 * 100), s)
    # Three tiers of three frames at 4 : 2 : 1 units of 900 / 21 tokens.
    t = sorted(sel.tokens.tolist())
    assert sel.tokens.sum() == 900 and t[:3] == [43] * 3 and set(t[3:6]) <= {85, 86, 87} and set(t[6:]) <= {171, 172}
    # Resolution follows relevance: a strictly more relevant frame never gets fewer tokens.
    for i in range(9):
        for j in range(9):
            if sel.scores[i] > sel.scores[j]:
                assert sel.tokens[i] >= sel.tokens[j]
    other = FRAMES.from_spec("qframe:seed=7,tau=1").select(synth_index, Budget(frames=9), s)
    assert not np.array_equal(other.index, sel.index)


def test_tstar_scores_few_and_finds_needles(synth, synth_index):
    s = relevance(synth_index, synth[1])
    cs = CandidateScores.fixed(synth_index, s)
    cs.values[:] = np.nan  # make the table lazy again, backed by the same relevance
    cs.scorer = _Lookup(s)
    sel = FRAMES.from_spec("tstar:rows=4,cols=4,search=0.15").select(synth_index, Budget(frames=4), cs)
    assert cs.frames_scored <= int(np.ceil(0.15 * len(synth_index)))
    assert sel.frames_scored == cs.frames_scored
    for e in synth[1].needle_events:
        assert any(e.contains(t) for t in sel.times)


class _Lookup:
    input = "thumbs"
    expensive = True
    frame_size = None

    def __init__(self, s):
        self.s = s

    def score(self, frames, query):
        return self.s[np.round(frames.pts_s).astype(int)]
