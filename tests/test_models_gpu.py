"""Model integration on CUDA (bf16, tiny random Qwen2.5-VL): the packed tower and the sparse prefill through the
Triton kernel agree with transformers' own SDPA paths within the bf16 rule of tests/tolerances.py."""

import numpy as np
import pytest
import torch
from tolerances import kernel_ok

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda_adapter():
    import copy

    from vidsparse.models.qwen2_5_vl import QwenVLAdapter
    from vidsparse.models.random import random_qwen2_5_vl

    m32, tok = random_qwen2_5_vl("small", dtype="float32", device="cuda")
    m16 = copy.deepcopy(m32).to(torch.bfloat16)  # the same weights, rounded
    return QwenVLAdapter(m32, tok), QwenVLAdapter(m16, tok)


def _frames(n, hw, seed=0):
    from vidsparse.types import Frames

    rng = np.random.default_rng(seed)
    return Frames(rng.integers(0, 255, (n, hw[0], hw[1], 3), dtype=np.uint8), np.arange(n) * 0.5)


@pytest.mark.parametrize("hw", [(84, 112), (252, 448)])
def test_packed_tower_bf16_within_rule(cuda_adapter, hw):
    ref_ad, ad = cuda_adapter
    fr = _frames(8, hw)
    ref_ad.fast_tower = False
    ref = ref_ad.encode_video(fr).tokens.features.float()  # fp32 transformers path = the reference
    ad.fast_tower = False
    base = ad.encode_video(fr).tokens.features.float()  # bf16 transformers path = the baseline
    ad.fast_tower = True
    got = ad.encode_video(fr).tokens.features.float()
    err, err_base = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    assert kernel_ok(err, err_base, torch.bfloat16), (err, err_base)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_sparse_prefill_through_kernel_on_model(cuda_adapter, backend):
    """Dense layout through the Triton kernel, or the block-wise torch path that GPUs without it run, vs SDPA in the
    same bf16 model (the whole forward's logits)."""
    from transformers import DynamicCache

    from vidsparse.models.hf import attention_scope
    from vidsparse.registry import PATTERNS

    ref_ad, ad = cuda_adapter
    fr = _frames(16, (252, 448), seed=1)
    enc32, enc = ref_ad.encode_video(fr), ad.encode_video(fr)
    p32, p = ref_ad.build_prompt(enc32, None, "what is on screen ?"), ad.build_prompt(enc, None, "what is on screen ?")
    assert p.input_ids.shape[1] > 512  # several 128-blocks

    def logits(a, prompt, **scope):
        with torch.inference_mode(), attention_scope(a.language_model(), **scope):
            return a.forward_logits(prompt.inputs_embeds, prompt.position_ids, DynamicCache(), embeds=True)

    ref = logits(ref_ad, p32)
    base = logits(ad, p)
    got = logits(ad, p, pattern=PATTERNS.from_spec("dense"), backend=backend)
    err, err_base = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    assert kernel_ok(err, err_base, torch.bfloat16), (err, err_base)


def test_pipeline_recipes_on_cuda(cuda_adapter, tmp_path):
    from vidsparse.pipeline import Pipeline
    from vidsparse.recipe import Budget, Recipe
    from vidsparse.video.synthetic import make_synthetic_video

    av = pytest.importorskip("av")  # noqa: F841
    _, ad = cuda_adapter
    path = str(tmp_path / "v.mp4")
    make_synthetic_video(path, duration_s=60.0, fps=4.0, width=448, height=252, seed=3, needles=1, distractors=0,
                         objects=0)
    for r in (Recipe(attention="block_topk", budget=Budget(frames=16, density=0.3)),
              Recipe(tokens="fastv:k=2,r=0.5", kv="snapkv:capacity=256,window=32", budget=Budget(frames=16))):
        st = Pipeline(ad, r, max_new_tokens=4).ask(path, "what is on screen ?").stats
        assert st.new_tokens >= 1 and st.peak_memory_mb > 0 and st.device.startswith("cuda")
        if r.attention:
            assert st.attention_density < 1.0
            assert 0 < st.ms_estimate < st.ms_prefill  # GPU time between events inside the prefill
        if r.kv:
            assert st.kv_entries[1] <= 256 + st.new_tokens


def test_kivi_fused_decode_on_cuda(cuda_adapter):
    """kivi through the real model classes on CUDA (fp32 "small" config, head dim 64): inside vidsparse's decode
    scope the steps go to the fused kernel (backend "auto"), and the tokens equal those of the torch path that
    dequantises the cache (backend "torch")."""
    from vidsparse.pipeline import Pipeline, RunStats
    from vidsparse.recipe import Recipe

    ad, _ = cuda_adapter
    enc = ad.encode_video(_frames(8, (252, 448), seed=4))
    runs = {}
    for backend in ("torch", "auto"):
        pipe = Pipeline(ad, Recipe(kv="kivi:residual=32"), max_new_tokens=8, backend=backend)
        prompt = ad.build_prompt(enc, None, "what is on screen ?")
        cache = pipe.kv.make_cache()
        _, logits, _ = pipe._prefill(prompt, cache, RunStats())
        runs[backend] = pipe._decode(prompt, cache, logits)
        assert cache.layers[0].quantized > 0 and cache.layers[0].fused_step == (backend == "auto")
    assert runs["auto"] == runs["torch"] and len(runs["auto"]) > 1


def test_compiled_packed_tower_bf16_within_rule(cuda_adapter):
    ref_ad, ad = cuda_adapter
    fr = _frames(8, (252, 448), seed=2)
    ref_ad.fast_tower = False
    ref = ref_ad.encode_video(fr).tokens.features.float()
    ad.fast_tower, ad.compile_tower = False, False
    base = ad.encode_video(fr).tokens.features.float()
    ad.fast_tower, ad.compile_tower = True, True
    try:
        got = ad.encode_video(fr).tokens.features.float()
    finally:
        ad.compile_tower = False
    err, err_base = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    assert kernel_ok(err, err_base, torch.bfloat16), (err, err_base)
    assert type(ad.vision_tower().blocks[0]).__name__.endswith("VisionBlock")  # swapped back
