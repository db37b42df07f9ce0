"""Model integration on tiny random-config Qwen2.5-VL models (real transformers classes, built in the test)."""

from __future__ import annotations

import numpy as np
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tolerances import FP32_SAME_ATOL, FP32_SAME_RTOL, MODEL_FP32_ATOL, MODEL_FP32_RTOL

from vidsparse.models.hf import attention_scope, last_query_attention
from vidsparse.models.qwen2_5_vl import pixel_values_videos, smart_resize
from vidsparse.models.random import build_random_qwen2_5_vl
from vidsparse.pipeline import RunStats
from vidsparse.recipe import Budget, Recipe
from vidsparse.registry import INLLM, KV, PATTERNS, TOKENS
from vidsparse.types import Frames

Q = "what is on screen ?"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_random_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from vidsparse.models.random import build_random_llava_onevision

    return build_random_llava_onevision(tmp_path_factory.mktemp("llava") / "tiny")


@pytest.fixture(scope="module")
def adapter(qwen_dir):
    from vidsparse.models import load_adapter

    return load_adapter(qwen_dir, device="cpu")


@pytest.fixture(scope="module")
def llava(llava_dir):
    from vidsparse.models import load_adapter

    return load_adapter(llava_dir, device="cpu")


def _encode(ad, hw):
    rng = np.random.default_rng(0)
    frames = Frames(rng.integers(0, 255, (6, hw[0], hw[1], 3), dtype=np.uint8), np.arange(6) * 0.5)
    return ad.encode_video(frames)


@pytest.fixture(scope="module")
def encoded(adapter):
    # 6 frames at 84x112: 3 temporal patches of 3x4 merged tokens = 36 visual tokens
    return _encode(adapter, (84, 112))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    from vidsparse.models import load_adapter
    from vidsparse.models.random import build_random_qwen2_vl

    return load_adapter(build_random_qwen2_vl(tmp_path_factory.mktemp("qwen2") / "tiny"), device="cpu")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision", "qwen2_vl"])
def both(request, adapter, encoded, llava, qwen2):
    """(adapter, encoded video) for each supported family."""
    if request.param == "qwen2_5_vl":
        return adapter, encoded
    if request.param == "qwen2_vl":
        return qwen2, _encode(qwen2, (84, 112))
    return llava, _encode(llava, (84, 84))  # 6 frames of 3x3 pooled tokens + the newline token


def vanilla_inputs(adapter, encoded):
    inp = adapter.full_inputs(encoded, Q)
    inp.pop("_span")
    return inp


def prompt_logits(adapter, prompt, cache=None):
    with torch.inference_mode():
        return adapter.forward_logits(prompt.inputs_embeds, prompt.position_ids,
                                      cache if cache is not None else transformers.DynamicCache(), embeds=True)


# ---- pixels ------------------------------------------------------------------------------------------------------

def test_pixel_layout_matches_qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessorPil()
    ref = proc(images=[img], return_tensors="pt")
    # a still image is a video of two identical frames in the Qwen layout
    pv, grid = pixel_values_videos(np.stack([img, img]), proc.image_mean, proc.image_std)
    assert grid == tuple(ref["image_grid_thw"][0].tolist()) == (1, 4, 6)
    torch.testing.assert_close(pv, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_smart_resize_rules():
    assert smart_resize(252, 448, max_pixels=10_000_000) == (252, 448)
    h, w = smart_resize(720, 1280, max_pixels=144 * 784)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 144 * 784 and abs(w / h - 16 / 9) < 0.2
    h, w = smart_resize(10, 10, min_pixels=4 * 784)
    assert (h, w) == (56, 56)
    from vidsparse.errors import InputError

    with pytest.raises(InputError):
        smart_resize(1, 500)


# ---- null recipe = vanilla transformers ---------------------------------------------------------------------------

def test_null_recipe_logits_and_tokens_equal_vanilla(both):
    """Vanilla = transformers' own forward/generate on the processed inputs (its own vision tower code path too)."""
    adapter, encoded = both
    inp = vanilla_inputs(adapter, encoded)
    with torch.inference_mode():
        ref = adapter.model(**inp, logits_to_keep=1).logits[:, -1].float()
    prompt = adapter.build_prompt(encoded, None, Q)
    got = prompt_logits(adapter, prompt)
    assert torch.equal(got, ref)
    # generation: vanilla generate vs the pipeline's decode loop with explicit positions
    gen = adapter.model.generate(**inp, max_new_tokens=8, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
    from vidsparse.pipeline import Pipeline

    pipe = Pipeline(adapter, Recipe(), max_new_tokens=8)
    cache = transformers.DynamicCache()
    _, logits, _ = pipe._prefill(prompt, cache, RunStats())
    toks = pipe._decode(prompt, cache, logits)
    eos = adapter.eos_token_ids()
    assert toks == gen[: len(toks)] and (len(toks) == 8 or toks[-1] in eos)
    assert len(set(gen)) > 1  # the tiny model's output is not constant, so equality means something


def test_reducer_at_full_budget_is_identity(both):
    adapter, encoded = both
    base = prompt_logits(adapter, adapter.build_prompt(encoded, None, Q))
    n = len(encoded.tokens)
    for name in ("pooling", "evs", "dycoke", "visionzip"):
        red = TOKENS.from_spec(name).reduce(encoded.tokens, n)
        assert torch.equal(prompt_logits(adapter, adapter.build_prompt(encoded, red, Q)), base), name


def test_positions_after_reduction_are_the_unreduced_positions(adapter, encoded):
    inp = adapter.full_inputs(encoded, Q)
    s, e = inp.pop("_span")
    full, _ = adapter.model.model.get_rope_index(inp["input_ids"], mm_token_type_ids=inp["mm_token_type_ids"],
                                                 video_grid_thw=inp["video_grid_thw"],
                                                 second_per_grid_ts=inp["second_per_grid_ts"])
    red = TOKENS.from_spec("evs").reduce(encoded.tokens, 14)
    p = adapter.build_prompt(encoded, red, Q)
    k = len(red)
    assert p.visual == (s, s + k) and p.input_ids.shape[1] == full.shape[2] - (e - s - k)
    keep = red.keep_index
    assert torch.equal(p.position_ids[:, 0, s:s + k], full[:, 0, s + keep])
    assert torch.equal(p.position_ids[:, 0, :s], full[:, 0, :s])
    assert torch.equal(p.position_ids[:, 0, s + k:], full[:, 0, e:])
    assert p.next_position == int(full.max()) + 1
    # the merged grid positions are the kept tokens' (t, h, w) in the unreduced grid
    assert torch.equal(p.visual_grid, encoded.tokens.positions[keep])
    ids = p.input_ids[0]
    assert int((ids == adapter.video_token_id).sum()) == k


# ---- attention interface -----------------------------------------------------------------------------------------

def test_dense_pattern_through_attention_interface_equals_sdpa(both):
    adapter, encoded = both
    prompt = adapter.build_prompt(encoded, None, Q)
    ref = prompt_logits(adapter, prompt)
    llm = adapter.language_model()
    before = {id(c): c._attn_implementation for c in [llm.config]}
    with attention_scope(llm, pattern=PATTERNS.from_spec("dense"), backend="reference") as scope:
        got = prompt_logits(adapter, prompt)
    assert scope.stats["sparse_calls"] == adapter.num_layers
    assert llm.config._attn_implementation == before[id(llm.config)]  # restored
    torch.testing.assert_close(got, ref, atol=MODEL_FP32_ATOL, rtol=MODEL_FP32_RTOL)


def test_scope_restores_implementation_on_error(adapter):
    llm = adapter.language_model()
    prev = llm.config._attn_implementation
    with pytest.raises(RuntimeError), attention_scope(llm):
        assert llm.config._attn_implementation == "vidsparse"
        raise RuntimeError("boom")
    assert llm.config._attn_implementation == prev


@pytest.mark.parametrize("spec", ["sink_window:sink=1,window=1", "block_topk:density=0.5", "power", "radial"])
def test_sparse_patterns_run_through_the_model(adapter, encoded, spec):
    """Small blocks (8) so the tiny prompt has many: every layer runs the pattern and the logits stay finite and
    differ from dense only by what the pattern drops."""
    from vidsparse.attention.patterns.base import SeqMeta

    prompt = adapter.build_prompt(encoded, None, Q)
    n = prompt.input_ids.shape[1]
    with attention_scope(adapter.language_model(), pattern=PATTERNS.from_spec(spec),
                         meta=SeqMeta(block_q=8, block_k=8, visual=prompt.visual, tokens_per_frame=12, frame_hw=(3, 4)),
                         backend="reference") as sc:
        got = prompt_logits(adapter, prompt)
    assert sc.stats["sparse_calls"] == adapter.num_layers and torch.isfinite(got).all()
    assert sc.stats["density_sum"] / adapter.num_layers < 1.0 or n <= 16


def test_last_query_attention_matches_eager_weights():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    kk = k.repeat_interleave(2, 1)
    full = torch.softmax((q @ kk.transpose(-1, -2)) / 8 ** 0.5 + torch.full((10, 10), float("-inf")).triu(1), -1)
    torch.testing.assert_close(last_query_attention(q, k), full[:, :, -1].mean(1))
    torch.testing.assert_close(last_query_attention(q, k, rows=3), full[:, :, -3:].mean((1, 2)))


# ---- in-LLM reducers ---------------------------------------------------------------------------------------------

def _run_cut(adapter, prompt, method, cache=None):
    cut = method.plan(prompt.visual, prompt.input_ids.shape[1], adapter.num_layers, prompt.visual_grid)
    cache = cache if cache is not None else transformers.DynamicCache()
    with attention_scope(adapter.language_model(), observers=[cut]), cut.installed(adapter.decoder_layers()):
        logits = prompt_logits(adapter, prompt, cache)
    return cut, cache, logits


def test_fastv_keeps_top_attended_tokens_and_shortens_later_layers(both):
    adapter, encoded = both
    prompt = adapter.build_prompt(encoded, None, Q)
    n = prompt.input_ids.shape[1]
    s, e = prompt.visual
    cut, cache, logits = _run_cut(adapter, prompt, INLLM.from_spec("fastv:k=2,r=0.5"))
    keep_visual = (e - s) - round(0.5 * (e - s))
    assert cut.current == n - (e - s) + keep_visual
    assert [c.keys.shape[2] for c in cache.layers] == [n, n] + [cut.current] * (adapter.num_layers - 2)
    # independent check: eager attention weights of layer k-1 (= 1), last row, head mean
    model = adapter.model
    llm_cfg = adapter.language_model().config
    llm_cfg._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            out = model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids, output_attentions=True)
    finally:
        llm_cfg._attn_implementation = "sdpa"
    row = out.attentions[1][0, :, -1].mean(0)[s:e]
    expect = row.topk(keep_visual).indices.sort().values + s
    got = cut.columns[(cut.columns >= s) & (cut.columns < e)]
    assert torch.equal(got, expect)


def test_fastv_r0_is_identity(both):
    adapter, encoded = both
    prompt = adapter.build_prompt(encoded, None, Q)
    ref = prompt_logits(adapter, prompt)
    cut, _, logits = _run_cut(adapter, prompt, INLLM.from_spec("fastv:k=2,r=0"))
    assert cut.current == prompt.input_ids.shape[1]
    torch.testing.assert_close(logits, ref, atol=MODEL_FP32_ATOL, rtol=MODEL_FP32_RTOL)


# ---- KV caches ---------------------------------------------------------------------------------------------------

def _prefill_with(adapter, prompt, cache, observe: bool):
    if observe:
        with attention_scope(adapter.language_model(), observers=[cache]):
            return prompt_logits(adapter, prompt, cache)
    return prompt_logits(adapter, prompt, cache)


def test_streaming_keeps_sinks_and_recent(both):
    adapter, encoded = both
    prompt = adapter.build_prompt(encoded, None, Q)
    full = transformers.DynamicCache()
    ref = prompt_logits(adapter, prompt, full)
    cache = KV.from_spec("streaming:capacity=20,sinks=4").make_cache()
    got = _prefill_with(adapter, prompt, cache, observe=False)
    assert torch.equal(got, ref)  # prefill attention itself is untouched
    for lf, lc in zip(full.layers, cache.layers):
        assert torch.equal(lc.keys, torch.cat([lf.keys[:, :, :4], lf.keys[:, :, -16:]], 2))
        assert torch.equal(lc.values, torch.cat([lf.values[:, :, :4], lf.values[:, :, -16:]], 2))


def test_snapkv_keeps_the_window_and_top_pooled_scores(both):
    adapter, encoded = both
    from vidsparse.kv.snapkv import snapkv_scores

    prompt = adapter.build_prompt(encoded, None, Q)
    full = transformers.DynamicCache()
    seen = {}

    class Grab:
        def on_prefill_attention(self, layer, q, k, v, out):
            seen[layer] = (q.clone(), k.clone())

    with attention_scope(adapter.language_model(), observers=[Grab()]):
        prompt_logits(adapter, prompt, full)
    cache = KV.from_spec("snapkv:capacity=24,window=8,kernel=5").make_cache()
    _prefill_with(adapter, prompt, cache, observe=True)
    n = prompt.input_ids.shape[1]
    for layer, (q, k) in seen.items():
        sc = snapkv_scores(q, k, 8, 5)
        # naive check of the score: per KV head, sum over window queries of softmax weights, GQA mean, then pooled
        assert sc.shape == (1, k.shape[1], n - 8)
        top = sc.topk(16, -1).indices.sort(-1).values
        idx = torch.cat([top, torch.arange(n - 8, n).expand(1, k.shape[1], 8)], -1)
        expect = torch.gather(full.layers[layer].keys, 2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
        assert torch.equal(cache.layers[layer].keys, expect)


def test_snapkv_scores_against_a_loop():
    from vidsparse.kv.snapkv import snapkv_scores

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    w = 4
    raw = torch.zeros(2, 8)
    for h in range(4):
        kh = k[0, h // 2]
        for i in range(12 - w, 12):
            s = (q[0, h, i] @ kh[: i + 1].T) / 8 ** 0.5
            p = torch.softmax(s, -1)
            raw[h // 2] += p[: 12 - w] / 2
    pooled = torch.stack([torch.stack([raw[h, max(0, j - 2): j + 3].mean() for j in range(8)]) for h in range(2)])
    torch.testing.assert_close(snapkv_scores(q, k, w, 5)[0], pooled, atol=1e-6, rtol=1e-5)


def test_snapkv_without_queries_is_a_clear_error(adapter, encoded):
    from vidsparse.errors import UnsupportedError

    prompt = adapter.build_prompt(encoded, None, Q)
    cache = KV.from_spec("snapkv:capacity=24,window=8").make_cache()
    logits = prompt_logits(adapter, prompt, cache)
    with pytest.raises(UnsupportedError, match="prefill queries"):
        adapter.forward_logits(logits.argmax(-1, keepdim=True), adapter.decode_position_ids(prompt, 0), cache, False)


# ---- pipeline ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_video(tmp_path_factory):
    from vidsparse.video.synthetic import make_synthetic_video

    path = str(tmp_path_factory.mktemp("askvid") / "v.mp4")
    make_synthetic_video(path, duration_s=60.0, fps=4.0, width=192, height=108, seed=3, needles=1, distractors=0,
                         objects=0)
    return path


@pytest.mark.parametrize("recipe", [
    Recipe(budget=Budget(frames=8)),
    Recipe(tokens="pooling", budget=Budget(frames=8, tokens=40)),
    Recipe(tokens="fastv:k=2,r=0.5", budget=Budget(frames=8)),
    Recipe(attention="block_topk", kv="snapkv:capacity=40,window=8", budget=Budget(frames=8, density=0.5)),
    Recipe(frames="uniform", kv="streaming:capacity=40", budget=Budget(frames=6, tokens=60)),
], ids=lambda r: r.to_cli())
def test_pipeline_stats_account_for_every_stage(adapter, short_video, recipe):
    from vidsparse.pipeline import Pipeline

    ans = Pipeline(adapter, recipe, max_new_tokens=4).ask(short_video, Q)
    st = ans.stats
    b = recipe.budget
    assert st.frames == b.frames and 1 <= st.new_tokens <= 4 and len(ans.token_ids) == st.new_tokens
    if recipe.tokens == "pooling":
        assert st.visual_tokens == 40 and st.tower_tokens > 40
    elif b.tokens is not None:
        assert st.visual_tokens <= b.tokens
    else:
        assert st.visual_tokens == st.tower_tokens
    assert st.prompt_tokens == st.visual_tokens + 20  # the chat template's 20 text tokens around the video
    if recipe.tokens and recipe.tokens.startswith("fastv"):
        assert st.llm_tokens_after_cut == st.prompt_tokens - st.visual_tokens // 2
    if recipe.kv:
        assert st.kv_entries[0] <= 40 + st.new_tokens
    assert st.ms_first_token >= st.ms_prefill + st.ms_vision > 0
    assert st.ms_first_token == pytest.approx(st.ms_selection + st.ms_decode + st.ms_vision + st.ms_reduction
                                              + st.ms_prefill, rel=0.05, abs=5.0)


def test_budget_below_the_smallest_resolution_is_a_clear_error(adapter, short_video):
    from vidsparse.errors import InputError
    from vidsparse.pipeline import Pipeline

    with pytest.raises(InputError, match="smallest resolution"):
        Pipeline(adapter, Recipe(budget=Budget(frames=8, tokens=5))).ask(short_video, Q)


def test_pipeline_bad_inputs(adapter, short_video, tmp_path):
    from vidsparse.errors import InputError, SpecError
    from vidsparse.pipeline import Pipeline

    with pytest.raises(SpecError):
        Pipeline(adapter, Recipe(tokens="fastvv"))
    with pytest.raises(SpecError):
        Pipeline(adapter, Recipe(kv="snapkv:capacity=4,window=8"))
    with pytest.raises(InputError):
        Pipeline(adapter, Recipe()).ask(str(tmp_path / "missing.mp4"), Q)
    with pytest.raises(InputError):
        Pipeline(adapter, Recipe()).ask(short_video, "   ")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(InputError):
        Pipeline(adapter, Recipe()).ask(str(bad), Q)


# ---- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_ask_end_to_end(qwen_dir, short_video):
    import json

    from typer.testing import CliRunner

    from vidsparse.cli import app

    res = CliRunner().invoke(app, ["ask", short_video, Q, "--model", qwen_dir, "--budget", "8", "--tokens", "evs",
                                   "--budget-tokens", "48", "--kv", "streaming:capacity=50", "--max-new-tokens", "3",
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["stats"]["frames"] == 8 and d["stats"]["visual_tokens"] == 48 and d["stats"]["new_tokens"] <= 3
    assert d["recipe"]["tokens"] == "evs" and isinstance(d["answer"], str)


@pytest.mark.parametrize("args, msg", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "/tmp"], "cannot load a model config"),
    (["--tokens", "nosuch"], "unknown"),
    (["--budget", "0"], "budget.frames"),
    (["--attention", "block_topk:density=x"], "density"),
])
def test_cli_ask_errors_exit_2(qwen_dir, short_video, args, msg):
    from typer.testing import CliRunner

    from vidsparse.cli import app

    base = ["ask", short_video, Q, "--device", "cpu"]
    if "--model" not in args:
        base += ["--model", qwen_dir]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output


def test_cli_ask_missing_video(qwen_dir, tmp_path):
    from typer.testing import CliRunner

    from vidsparse.cli import app

    res = CliRunner().invoke(app, ["ask", str(tmp_path / "nope.mp4"), Q, "--model", qwen_dir])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_llava_pipeline_with_reducer(llava, short_video):
    from vidsparse.errors import InputError
    from vidsparse.pipeline import Pipeline

    ans = Pipeline(llava, Recipe(tokens="dycoke", budget=Budget(frames=6, tokens=30)), max_new_tokens=3).ask(
        short_video, Q)
    st = ans.stats
    assert st.frame_size == (84, 84) and st.tower_tokens == 54 and st.visual_tokens == 30
    before, after = llava.prompt_text(Q)
    text = sum(len(llava.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (before, after))
    assert st.prompt_tokens == 30 + 1 + text  # + the newline token
    with pytest.raises(InputError, match="token reducer"):
        Pipeline(llava, Recipe(budget=Budget(frames=6, tokens=30))).ask(short_video, Q)
    from vidsparse.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="pixel motion"):
        Pipeline(llava, Recipe(tokens="static_patches", budget=Budget(frames=6, tokens=30)))
    with pytest.raises(UnsupportedError, match="compiled tower"):
        Pipeline(llava, Recipe(), compile_tower=True)


# ---- vision tower fast path (issue 7) ----------------------------------------------------------------------------

def test_varlen_attention_equals_per_segment_sdpa():
    from vidsparse.models.hf import varlen_attention

    g = torch.Generator().manual_seed(3)
    lengths = [64, 16, 64, 5, 16, 64, 1]
    cu = torch.tensor([0] + list(np.cumsum(lengths)))
    n = int(cu[-1])
    q, k, v = (torch.randn(1, 3, n, 8, generator=g) for _ in range(3))
    got = varlen_attention(q, k, v, cu, scale=0.3)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.3)
        torch.testing.assert_close(got[:, :, a:b], ref, atol=1e-6, rtol=1e-6)
    # equal segments back to back take the reshape path
    cu2 = torch.arange(0, n + 1, n // 7 if n % 7 == 0 else 1)
    got2 = varlen_attention(q, k, v, cu2)
    ref2 = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                      for a, b in zip(cu2[:-1].tolist(), cu2[1:].tolist())], 2)
    torch.testing.assert_close(got2, ref2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("hw", [(84, 112), (252, 448)])
def test_fast_tower_equals_transformers_tower(adapter, qwen2, hw, family):
    """The packed path vs transformers' own per-window SDPA loop on the same pixels (windows of unequal size at the
    bottom edge for 252x448)."""
    adapter = adapter if family == "qwen2_5_vl" else qwen2
    rng = np.random.default_rng(5)
    frames = Frames(rng.integers(0, 255, (4, hw[0], hw[1], 3), dtype=np.uint8), np.arange(4) * 0.5)
    try:
        adapter.fast_tower = False
        ref = adapter.encode_video(frames).tokens.features
        adapter.fast_tower = True
        got = adapter.encode_video(frames).tokens.features
    finally:
        adapter.fast_tower = True
    torch.testing.assert_close(got, ref, atol=MODEL_FP32_ATOL, rtol=MODEL_FP32_RTOL)
    assert adapter.vision_tower().config._attn_implementation == "sdpa"  # restored


# ---- FrameFusion and ZipVL ---------------------------------------------------------------------------------------

def test_framefusion_merges_identical_frames_into_the_first(adapter):
    """Four identical frame pairs: every token of pairs 2-4 has cosine 1 with its predecessor and merges into pair 1's
    token at the same (h, w); with cost=1 nothing is pruned, and the merged hidden state is the original one, so the
    logits equal those of a prompt holding only the first pair's tokens at their own positions."""
    rng = np.random.default_rng(7)
    one = rng.integers(0, 255, (2, 84, 112, 3), dtype=np.uint8)
    enc = adapter.encode_video(Frames(np.concatenate([one] * 4), np.arange(8) * 0.5))
    prompt = adapter.build_prompt(enc, None, Q)
    cut, cache, logits = _run_cut(adapter, prompt, INLLM.from_spec("framefusion:sim=0.999,cost=1.0,merge_layers=1"))
    s, e = prompt.visual
    per = 12
    assert cut.merged == 3 * per
    assert cut.trace[0] == (0, prompt.input_ids.shape[1] - 3 * per)
    vis_cols = cut.columns[(cut.columns >= s) & (cut.columns < e)]
    assert torch.equal(vis_cols, torch.arange(s, s + per))
    keep = torch.arange(per)
    from vidsparse.types import Reduction

    only_first = adapter.build_prompt(enc, Reduction(enc.tokens.features[:per], keep, enc.tokens, "first"), Q)
    torch.testing.assert_close(logits, prompt_logits(adapter, only_first), atol=MODEL_FP32_ATOL, rtol=MODEL_FP32_RTOL)


def test_framefusion_prunes_to_the_cost_budget(adapter, encoded):
    prompt = adapter.build_prompt(encoded, None, Q)
    n, layers = prompt.input_ids.shape[1], adapter.num_layers
    cut, cache, _ = _run_cut(adapter, prompt, INLLM.from_spec("framefusion:sim=1.01,cost=0.8,k=2"))
    assert cut.merged == 0
    # layers 0-1 see all n tokens; the last two share what is left of 0.8 x layers x n
    assert cut.current == round((0.8 * layers * n - 2 * n) / (layers - 2))
    assert sum(c for _, c in cut.trace) <= 0.8 * layers * n + layers  # rounding: at most one token per layer
    assert [c.keys.shape[2] for c in cache.layers][2:] == [cut.current] * (layers - 2)


def test_subset_attention_against_masked_reference():
    from vidsparse.attention.reference import masked_attention
    from vidsparse.models.hf import subset_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 4, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8,
                                                                                                         generator=g)
    keys = torch.tensor([0, 1, 5, 9, 10, 22, 39])
    kept = torch.zeros(40, dtype=torch.bool)
    kept[keys] = True
    i = torch.arange(40)
    mask = (i[None, :] <= i[:, None]) & (kept[None, :] | torch.eye(40, dtype=torch.bool))
    ref = masked_attention(q, k, v, mask)
    for chunk in (7, 4096):
        torch.testing.assert_close(subset_attention(q, k, v, keys, chunk=chunk, backend="reference"), ref, atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("n,keys", [(300, [0, 1, 5, 9, 140, 141, 200, 299]), (300, list(range(0, 300, 3))),
                                    (77, [76]), (70, [])])
def test_key_subset_kernel_against_masked_reference(n, keys):
    """The block kernel on gathered keys (original positions as the causal mask) plus the own-key merge through its
    log-sum-exp equals masked attention (Triton interpreter on the CPU)."""
    from vidsparse.attention.ops import key_subset_attention
    from vidsparse.attention.reference import masked_attention

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h in (4, 2, 2))
    keys = torch.tensor(keys, dtype=torch.long)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keys] = True
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None]) & (kept[None, :] | torch.eye(n, dtype=torch.bool))
    torch.testing.assert_close(key_subset_attention(q, k, v, keys, block=32), masked_attention(q, k, v, mask),
                               atol=FP32_SAME_ATOL, rtol=FP32_SAME_RTOL)


@pytest.mark.parametrize("n,block,pick", [(300, 32, "every3"), (300, 32, "random"), (77, 32, [76]), (20, 32, [0, 19]),
                                           (1000, 128, "random"), (1000, 128, "all"), (256, 128, "first"),
                                           (300, 32, []), (300, 32, list(range(31)) + [32, 40, 64])])
def test_subset_blocks_equal_the_general_layout(n, block, pick):
    """key_subset_attention's layout, computed straight from the sorted positions, equals the general route
    (BlockLayout.from_index over the key blocks that start at or before each row's last query, then full_prefix on
    the positions), exactly."""
    from vidsparse.attention.kernels.block_sparse import full_prefix
    from vidsparse.attention.layout import BlockLayout
    from vidsparse.attention.ops import subset_blocks

    g = torch.Generator().manual_seed(n + block)
    keys = {"every3": torch.arange(0, n, 3), "all": torch.arange(n), "first": torch.arange(block + 5),
            "random": torch.sort(torch.randperm(n, generator=g)[: n // 2]).values}.get(pick) if isinstance(pick, str) \
        else torch.tensor(pick, dtype=torch.long)
    m = keys.numel()
    index, count, nfull = subset_blocks(keys, n, block)
    nqb, nkb = -(-n // block), -(-m // block)
    last_q = torch.clamp((torch.arange(nqb) + 1) * block, max=n) - 1
    want_count = (keys[::block][None, :] <= last_q[:, None]).sum(-1)
    lay = BlockLayout.from_index(torch.arange(nkb).expand(1, 1, nqb, nkb), want_count.view(1, 1, nqb), block, block,
                                 n, m, causal=False)
    full = torch.full((1,), m, dtype=torch.int32)
    want_full = full_prefix(lay.kv_index, lay.kv_count, block, block, True, torch.full((1,), n, dtype=torch.int32),
                            full, keys.to(torch.int32).view(1, 1, m), 1, 0)
    assert index.dtype == count.dtype == nfull.dtype == torch.int32
    assert torch.equal(index.expand_as(lay.kv_index), lay.kv_index)
    assert torch.equal(count, lay.kv_count) and torch.equal(nfull, want_full)
    assert (nfull <= count).all()


def test_zipvl_top_mass_and_full_tau_identity(adapter, encoded):
    from vidsparse.tokens.inllm.zipvl import top_mass

    mass = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    assert top_mass(mass, torch.arange(5), 0.7).tolist() == [1, 3]
    assert top_mass(mass, torch.arange(5), 0.71).tolist() == [1, 3, 4]
    prompt = adapter.build_prompt(encoded, None, Q)
    ref = prompt_logits(adapter, prompt)
    sel = INLLM.from_spec("zipvl:tau=1.0").plan(prompt.visual, prompt.input_ids.shape[1], adapter.num_layers)
    with attention_scope(adapter.language_model(), observers=[sel]) as sc:
        got = prompt_logits(adapter, prompt)
    torch.testing.assert_close(got, ref, atol=MODEL_FP32_ATOL, rtol=MODEL_FP32_RTOL)
    assert sc.stats["subset_calls"] == adapter.num_layers - 1
    sel = INLLM.from_spec("zipvl:tau=0.5").plan(prompt.visual, prompt.input_ids.shape[1], adapter.num_layers)
    with attention_scope(adapter.language_model(), observers=[sel]):
        prompt_logits(adapter, prompt)
    n_vis = prompt.visual[1] - prompt.visual[0]
    assert all(1 <= c < n_vis for c in sel.kept.values())


# ---- static patch skipping (issue 7) -----------------------------------------------------------------------------

def _static_video(noise: int, seed=11):
    """8 frames = 4 temporal patches: patch 0 random, patch 1 = patch 0 (+ noise), patch 2 new content, patch 3 = 2
    except one 28x28 block that changes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(20, 235, (2, 84, 112, 3), dtype=np.int16)
    b = rng.integers(20, 235, (2, 84, 112, 3), dtype=np.int16)
    c = b.copy()
    c[:, 28:56, 56:84] = rng.integers(20, 235, (2, 28, 28, 3))
    jitter = lambda x: x + rng.integers(-noise, noise + 1, x.shape) if noise else x
    frames = np.concatenate([a, jitter(a), b, c]).clip(0, 255).astype(np.uint8)
    return Frames(frames, np.arange(8) * 0.5)


def test_static_patches_skip_exact_when_pixels_repeat(adapter):
    fr = _static_video(noise=0)
    full = adapter.encode_video(fr)
    enc = adapter.encode_video(fr, skip_static=0.02)
    assert enc.encoded_frames == 6  # patch 1 (frames 2-3) repeats patch 0 and is not encoded
    torch.testing.assert_close(enc.tokens.features, full.tokens.features, atol=1e-6, rtol=1e-6)
    m = enc.tokens.motion.view(4, 12)
    assert torch.isinf(m[0]).all() and (m[1] == 0).all() and (m[2] > 0.1).all()
    moved = (m[3] > 0.02).nonzero().squeeze(1).tolist()
    assert moved == [6]  # the one 28x28 block at merged (row 1, col 2) of the 3x4 grid


def test_static_patches_reuse_fidelity_under_noise(adapter):
    from tolerances import STATIC_REUSE_COS

    fr = _static_video(noise=2)
    full = adapter.encode_video(fr)
    enc = adapter.encode_video(fr, skip_static=0.05)
    assert enc.encoded_frames == 6
    cos = torch.nn.functional.cosine_similarity(enc.tokens.features[12:24], full.tokens.features[12:24], dim=-1)
    assert cos.min() >= STATIC_REUSE_COS, f"reused-token cosine {cos.min():.5f} < {STATIC_REUSE_COS}"


def test_static_patches_reducer_keeps_what_moves(adapter):
    enc = adapter.encode_video(_static_video(noise=0), skip_static=0.02)
    red = TOKENS.from_spec("static_patches").reduce(enc.tokens, 12 + 12 + 1)
    # patch 0 (always), patch 2 (new content), and the one moving token of patch 3
    assert red.keep_index.tolist() == list(range(12)) + list(range(24, 36)) + [36 + 6]


def test_pipeline_static_patches_reports_encoded_frames(adapter, tmp_path):
    from vidsparse.pipeline import Pipeline
    from vidsparse.video.synthetic import write_video

    rng = np.random.default_rng(3)
    still = rng.integers(0, 255, (84, 112, 3), dtype=np.uint8)
    frames = [still] * 16 + [rng.integers(0, 255, (84, 112, 3), dtype=np.uint8) for _ in range(16)]
    path = str(tmp_path / "half_static.mp4")
    write_video(path, frames, fps=2.0, codec="libx264", options={"crf": "0", "preset": "ultrafast"})
    st = Pipeline(adapter, Recipe(tokens="static_patches:tau=0.05", budget=Budget(frames=16, tokens=60)),
                  max_new_tokens=2).ask(path, Q).stats
    assert st.frames == 16 and st.encoded_frames < st.frames and st.visual_tokens == 60


def test_compressing_cache_works_with_transformers_generate(adapter, encoded):
    """A streaming cache handed to transformers' own generate gives the tokens of vidsparse's decode loop with the
    same cache policy (positions follow the tokens seen, masks the entries kept)."""
    from vidsparse.pipeline import Pipeline

    inp = vanilla_inputs(adapter, encoded)
    cache = KV.from_spec("streaming:capacity=24,sinks=4").make_cache()
    kw = {adapter._cache_kw: cache}
    gen = adapter.model.generate(**inp, max_new_tokens=6, do_sample=False, **kw)[0, inp["input_ids"].shape[1]:]
    assert cache.get_seq_length() == inp["input_ids"].shape[1] + 5 and cache.entries(0) == 24
    pipe = Pipeline(adapter, Recipe(kv="streaming:capacity=24,sinks=4"), max_new_tokens=6)
    prompt = adapter.build_prompt(encoded, None, Q)
    c2 = pipe.kv.make_cache()
    _, logits, _ = pipe._prefill(prompt, c2, RunStats())
    toks = pipe._decode(prompt, c2, logits)
    assert toks == gen.tolist()[: len(toks)]
    full = adapter.model.generate(**inp, max_new_tokens=6, do_sample=False)[0, inp["input_ids"].shape[1]:]
    assert full.tolist() != gen.tolist()  # eviction changes the answer of this random model: the check has teeth


def _decoded(adapter, encoded, kv, new=6):
    """The tokens vidsparse's prefill and decode loop produce with the cache of ``kv`` (None: transformers' own
    ``DynamicCache``), and that cache."""
    from vidsparse.pipeline import Pipeline

    pipe = Pipeline(adapter, Recipe(kv=kv), max_new_tokens=new)
    prompt = adapter.build_prompt(encoded, None, Q)
    cache = pipe.kv.make_cache() if kv else transformers.DynamicCache()
    _, logits, _ = pipe._prefill(prompt, cache, RunStats())
    return pipe._decode(prompt, cache, logits), cache


def test_kivi_cache_through_the_model(both):
    """``kivi`` inside each family's real model classes: with a window longer than the run nothing is quantised and
    the tokens are the full cache's; with a window of 4 and groups of 8 the layers hold quantised tokens (every
    entry is counted), and at 2 bits they store fewer bytes than the full cache."""
    from vidsparse.kv.base import cache_nbytes

    adapter, encoded = both
    full, dense = _decoded(adapter, encoded, None)
    same, unq = _decoded(adapter, encoded, "kivi:residual=100000")
    assert same == full and unq.layers[0].quantized == 0
    toks, cache = _decoded(adapter, encoded, "kivi:bits=2,group=8,residual=4")
    n = dense.get_seq_length()
    for layer in cache.layers:
        assert layer.get_seq_length() == n and layer.quantized >= n - 4 - 7 and layer.quantized % 8 == 0
    assert cache_nbytes(cache) < 0.6 * cache_nbytes(dense)


@pytest.mark.parametrize("spec", ["vidkv:group=8,residual=4", "mustafar:group=8,residual=4"])
def test_vidkv_and_mustafar_caches_through_the_model(adapter, encoded, spec):
    """``vidkv`` and ``mustafar`` in the real model classes: with a window longer than the run the tokens are the
    full cache's; with groups of 8 and a window of 4 the layers hold compressed tokens (every entry counted) in fewer
    bytes than the full cache, and transformers' generate with the cache gives vidsparse's decode tokens."""
    from vidsparse.kv.base import cache_nbytes

    name = spec.split(":")[0]
    full, dense = _decoded(adapter, encoded, None)
    same, _ = _decoded(adapter, encoded, f"{name}:residual=100000")
    assert same == full
    toks, cache = _decoded(adapter, encoded, spec)
    assert all(layer.quantized > 0 and layer.get_seq_length() == dense.get_seq_length() for layer in cache.layers)
    assert cache_nbytes(cache) < 0.6 * cache_nbytes(dense)
    inp = vanilla_inputs(adapter, encoded)
    c2 = KV.from_spec(spec).make_cache()
    gen = adapter.model.generate(**inp, max_new_tokens=6, do_sample=False, **{adapter._cache_kw: c2})
    assert toks == gen[0, inp["input_ids"].shape[1]:].tolist()[: len(toks)]


def test_kivi_cache_works_with_transformers_generate(adapter, encoded):
    """A kivi cache handed to transformers' own generate gives the tokens of vidsparse's decode loop with the same
    cache (8 bits, groups of 8, a window of 4: most of the prompt is quantised when the first token is decoded)."""
    inp = vanilla_inputs(adapter, encoded)
    spec = "kivi:bits=8,group=8,residual=4"
    cache = KV.from_spec(spec).make_cache()
    gen = adapter.model.generate(**inp, max_new_tokens=6, do_sample=False, **{adapter._cache_kw: cache})
    gen = gen[0, inp["input_ids"].shape[1]:]
    assert cache.get_seq_length() == inp["input_ids"].shape[1] + 5 and cache.layers[0].quantized > 0
    toks, _ = _decoded(adapter, encoded, spec)
    assert toks == gen.tolist()[: len(toks)]


def test_kivi_fused_decode_through_the_pipeline(adapter, encoded):
    """Inside vidsparse's decode scope the kivi cache hands its decode steps to the Triton kernel (here in the
    interpreter, backend "kernel"): the updates return the window alone, the kernel reads the packed codes, and the
    tokens equal those of the torch path that dequantises the cache (backend "torch"); the scope turns the fused
    mode off again on exit."""
    from vidsparse.pipeline import Pipeline

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel on the CPU needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")
    spec = "kivi:bits=2,group=16,residual=16"
    runs = {}
    for backend in ("torch", "kernel"):
        pipe = Pipeline(adapter, Recipe(kv=spec), max_new_tokens=6, backend=backend)
        prompt = adapter.build_prompt(encoded, None, Q)
        cache = pipe.kv.make_cache()
        _, logits, _ = pipe._prefill(prompt, cache, RunStats())
        runs[backend] = pipe._decode(prompt, cache, logits)
        layer = cache.layers[0]
        assert layer.quantized > 0 and layer.fused_step == (backend == "kernel")
        assert cache.fused == "off" and layer.fused == "off"
    assert runs["kernel"] == runs["torch"] and len(runs["torch"]) > 1


def test_token_sparse_pattern_through_the_model_from_its_layer(adapter, short_video):
    from vidsparse.pipeline import Pipeline

    pipe = Pipeline(adapter, Recipe(attention="token_sparse:coverage=0.5,window=8,from_layer=2",
                                    budget=Budget(frames=8)), max_new_tokens=2, backend="reference")
    st = pipe.ask(short_video, Q).stats
    assert st.attention_density < 1.0 and st.new_tokens >= 1


def test_grid_pattern_through_the_pipeline(adapter, short_video):
    from vidsparse.pipeline import Pipeline

    st = Pipeline(adapter, Recipe(attention="grid:stride=4", budget=Budget(frames=8)), max_new_tokens=2,
                  backend="reference").ask(short_video, Q).stats
    assert st.attention_density < 1.0 and st.new_tokens >= 1
    assert st.ms_estimate > 0  # the estimation's time is reported (host-timed on the CPU)


@pytest.mark.parametrize("spec,frames", [("pyramid:exact=0,pool2=0.3,pool4=0.6,pool8=1,sink=0", 8),
                                         ("pbs:segment=128,tau=0.3,first_block=false", 24)])
def test_pyramid_and_pbs_through_the_pipeline(adapter, short_video, spec, frames):
    from vidsparse.pipeline import Pipeline

    st = Pipeline(adapter, Recipe(attention=spec, budget=Budget(frames=frames)), max_new_tokens=2,
                  backend="reference").ask(short_video, Q).stats
    assert st.attention_density < 1.0 and st.new_tokens >= 1


def test_uniform_times_follow_qwen_vl_utils():
    from vidsparse.pipeline import uniform_times
    from vidsparse.types import VideoInfo

    info = VideoInfo(path="x", duration_s=60.0, avg_fps=30.0, width=640, height=360, codec="h264", is_vfr=False,
                     n_frames=1800, start_s=0.0)
    t = uniform_times(info, 768)
    assert len(t) == 120 and t[0] == 0.0 and t[-1] == pytest.approx(60.0 - 1 / 30)  # 2 fps over 60 s
    assert len(uniform_times(info, 32)) == 32  # capped by the frame budget
    short = VideoInfo(path="x", duration_s=1.0, avg_fps=30.0, width=640, height=360, codec="h264", is_vfr=False,
                      n_frames=30, start_s=0.0)
    assert len(uniform_times(short, 768)) == 4  # at least 4 frames, as qwen-vl-utils
