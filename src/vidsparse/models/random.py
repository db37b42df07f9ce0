"""Random-weight checkpoints of the real architectures, written to a local directory: tests (tiny configs) and
benchmarks (full-size Qwen2.5-VL-7B shapes) run the real transformers classes without downloading anything.

The tokenizer is a word-level ``tokenizers`` model whose vocabulary holds the chat-format special tokens at the ids the
config names, plus a handful of words; answers from random weights are meaningless, timings and shapes are real."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "the", "what", "is", "on", "screen", "video", "red", "ball", "gate", "47", "yes", "no", "A", "B", "C",
         "D", "answer", "color", "?", ".", "show", "shown", "text", "which", "of", "following"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "system", "user", "assistant", "You", "are", "helpful",
                "assistant.", "\n"]

SIZES = {
    # name: (text kwargs, vision kwargs)
    "tiny": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=32768, initializer_range=0.3,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
             dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  tokens_per_second=2)),
    # head_dim 64: the smallest shape vidsparse's Triton kernel runs (GPU tests)
    "small": (dict(hidden_size=256, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=32768, initializer_range=0.1,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}),
              dict(depth=2, hidden_size=128, intermediate_size=192, num_heads=2, out_hidden_size=256, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                   tokens_per_second=2)),
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2)),
}


def _word_tokenizer(vocab: dict[str, int], eos: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                  pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, pad_token=eos)
    specials = [w for w in vocab if w.startswith("<|")]
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def _vocab(specials: list[str], vocab_size: int, special_base: int = 0, other_base: int = 100) -> dict[str, int]:
    """Word-level vocabulary: markup tokens ("<...") from ``special_base``, chat words from ``other_base``, the
    sample ``WORDS`` from 20, ``<unk>`` last."""
    vocab = {"<unk>": vocab_size - 1}
    for i, w in enumerate(specials):
        vocab[w] = (special_base if w.startswith("<") else other_base) + i
    for i, w in enumerate(WORDS):
        vocab.setdefault(w, 20 + i)
    return vocab


def _qwen_ids(vocab: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The Qwen special-token ids and the config keywords that name them."""
    ids = {w: vocab[w] for w in QWEN_SPECIAL if w.startswith("<|")}
    kw = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
              tie_word_embeddings=False)
    return ids, kw


def _instantiate(cls, cfg, seed: int, dtype: str, device: str, eos: int, pad: int):
    """``cls(cfg)`` initialised by transformers' ``post_init`` directly on ``device`` in ``dtype``, seeded."""
    import torch

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model.eval()


def _save(model, tok, path) -> str:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def random_qwen2_5_vl(size: str = "tiny", seed: int = 0, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer): a random-weight ``Qwen2_5_VLForConditionalGeneration`` of ``size`` ("tiny" or "7b"),
    initialised by transformers' own ``post_init`` directly on ``device`` in ``dtype``."""
    import transformers

    text, vision = SIZES[size]
    vocab_size = text["vocab_size"]
    vocab = _vocab(QWEN_SPECIAL, vocab_size, special_base=151643 if size == "7b" else 0,
                   other_base=1000 if size == "7b" else 100)
    ids, token_kw = _qwen_ids(vocab)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=vision, **token_kw)
    model = _instantiate(transformers.Qwen2_5_VLForConditionalGeneration, cfg, seed, dtype, device,
                         ids["<|im_end|>"], ids["<|endoftext|>"])
    return model, _word_tokenizer(vocab, "<|im_end|>")


def random_qwen2_vl(seed: int = 0, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer): a tiny random-weight ``Qwen2VLForConditionalGeneration`` (full attention per frame pair in
    the tower, 1-D temporal M-RoPE ids)."""
    import transformers

    text, _ = SIZES["tiny"]
    vocab = _vocab(QWEN_SPECIAL, text["vocab_size"])
    ids, token_kw = _qwen_ids(vocab)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **token_kw)
    model = _instantiate(transformers.Qwen2VLForConditionalGeneration, cfg, seed, dtype, device,
                         ids["<|im_end|>"], ids["<|endoftext|>"])
    return model, _word_tokenizer(vocab, "<|im_end|>")


def build_random_qwen2_vl(path: str | Path, seed: int = 0) -> str:
    """Write ``random_qwen2_vl()`` (weights + tokenizer) to ``path``; returns the path."""
    return _save(*random_qwen2_vl(seed), path)


def build_random_qwen2_5_vl(path: str | Path, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> str:
    """Write ``random_qwen2_5_vl(size)`` (weights + tokenizer) to ``path``; returns the path."""
    return _save(*random_qwen2_5_vl(size, seed, dtype), path)


LLAVA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "user", "assistant", "\n"]


def random_llava_onevision(seed: int = 0, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer): a tiny random-weight ``LlavaOnevisionForConditionalGeneration`` (Qwen2 LLM, SigLIP tower
    at 84 px: 6×6 patches pooled to 3×3 tokens a frame)."""
    import transformers

    vocab = _vocab(LLAVA_SPECIAL, 128)
    cfg = transformers.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096,
                         initializer_range=0.3, eos_token_id=vocab["<|im_end|>"]),
        vision_config=dict(model_type="siglip_vision_model", image_size=84, patch_size=14, hidden_size=32,
                           intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
        image_token_id=vocab["<image>"], video_token_id=vocab["<video>"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False)
    model = _instantiate(transformers.LlavaOnevisionForConditionalGeneration, cfg, seed, dtype, device,
                         vocab["<|im_end|>"], vocab["<|endoftext|>"])
    return model, _word_tokenizer(vocab, "<|im_end|>")


def build_random_llava_onevision(path: str | Path, seed: int = 0) -> str:
    """Write ``random_llava_onevision()`` (weights + tokenizer) to ``path``; returns the path."""
    return _save(*random_llava_onevision(seed), path)
