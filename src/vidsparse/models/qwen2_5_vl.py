"""Qwen2.5-VL (and Qwen2-VL) adapter on transformers' ``Qwen2_5_VLForConditionalGeneration``.

Pixels: vidsparse builds ``pixel_values_videos`` itself (transformers' video processor needs torchvision), following
the Qwen2-VL patch layout — 14-pixel patches, 2 frames per temporal patch, 2×2 merge windows contiguous — with CLIP
normalisation; ``tests/test_models.py`` checks it against ``Qwen2VLImageProcessor`` on the same frames. One LLM token
covers 28×28 pixels of two consecutive frames.

Positions: the model's own ``get_rope_index`` gives the M-RoPE (t, h, w) ids of the *unreduced* sequence; the kept
tokens keep theirs and the text after the video keeps its own, so a reducer changes which tokens are present, never
where they sit in time or space. Generated tokens continue from the unreduced sequence's maximum + 1, as in vanilla
``generate``.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from ..errors import InputError
from ..types import Frames, Reduction, Selection, VideoInfo, VisualTokens
from .base import EncodedVideo, ModelAdapter, Prompt

SYSTEM = "You are a helpful assistant."
# qwen-vl-utils video defaults (tokens are per temporal patch of two frames)
MIN_TOKENS, MAX_TOKENS = 128, 768
TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                 max_pixels: int = 768 * 28 * 28) -> tuple[int, int]:
    """qwen-vl-utils' rule: both sides multiples of ``factor``, pixels in [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise InputError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"aspect ratio of {width}x{height} is above 200: Qwen2.5-VL cannot take it")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def default_tokens_per_frame(num_frames: int) -> int:
    """qwen-vl-utils' per-frame pixel cap for ``num_frames`` frames, in LLM tokens per temporal patch."""
    pixels = max(min(MAX_TOKENS * 784, TOTAL_PIXELS / max(num_frames, 1) * 2), MIN_TOKENS * 784 * 1.05)
    return int(pixels // 784)


def pixel_values_videos(frames: np.ndarray, mean, std, patch: int = 14, temporal: int = 2, merge: int = 2,
                        device=None):
    """uint8 [T, H, W, 3] (H, W multiples of patch·merge) -> (float32 [gt·gh·gw, 3·temporal·patch²], (gt, gh, gw)).

    T is padded to a multiple of ``temporal`` by repeating the last frame (as the Qwen processors do). The uint8
    frames move to ``device`` first, so the float work runs there (768 frames: ~1 s on a CPU, ~ms on a GPU)."""
    t, h, w, _ = frames.shape
    if h % (patch * merge) or w % (patch * merge):
        raise InputError(f"frame size {w}x{h} is not a multiple of {patch * merge}")
    if t % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - t % temporal, 0)])
        t = frames.shape[0]
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device or "cpu").float().mul_(1.0 / 255.0)
    x = (x - torch.tensor(mean, dtype=torch.float32, device=x.device)) / torch.tensor(std, dtype=torch.float32,
                                                                                      device=x.device)
    x = x.permute(0, 3, 1, 2)  # T, C, H, W
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.reshape(gt, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * temporal * patch * patch).contiguous(), (gt, gh, gw)


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_5_vl", "qwen2_vl")
    supports_compile = True
    supports_pixel_motion = True
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, model, tokenizer, device=None, fast_tower: bool = True):
        super().__init__(model, tokenizer, device)
        self.fast_tower = fast_tower  # packed window attention (models.hf.vision_scope) instead of a per-window loop
        vc = model.config.vision_config
        self.patch = int(getattr(vc, "patch_size", 14))
        self.temporal = int(getattr(vc, "temporal_patch_size", 2))
        self.merge = int(getattr(vc, "spatial_merge_size", 2))
        self.factor = self.patch * self.merge
        cfg = model.config
        self.video_token_id = int(getattr(cfg, "video_token_id", None) or cfg.text_config.video_token_id)
        self.vision_start_id = getattr(cfg, "vision_start_token_id", None)

    # --- modules ---
    def language_model(self):
        return self.model.model.language_model

    def vision_tower(self):
        return self.model.model.visual

    # --- frames ---
    def frame_size(self, info: VideoInfo, selection: Selection, tokens_per_frame: int | None) -> tuple[int, int]:
        n = len(selection)
        tpf = default_tokens_per_frame(n) if tokens_per_frame is None else int(tokens_per_frame)
        if tpf < 1:
            raise InputError(f"{tpf} tokens per frame is too few: raise the token budget or lower the frame budget")
        return smart_resize(info.height, info.width, self.factor, min_pixels=4 * self.factor ** 2,
                            max_pixels=max(4, tpf) * self.factor ** 2)

    def pixels(self, frames: Frames):
        return pixel_values_videos(frames.data, self.mean, self.std, self.patch, self.temporal, self.merge,
                                   device=self.device)

    @torch.inference_mode()
    def encode_video(self, frames: Frames, skip_static: float | None = None) -> EncodedVideo:
        """``skip_static``: temporal patches whose every token changed less than this (``token_motion``) since the
        previous patch are not encoded and reuse its tokens (``tokens/static_patches.py``)."""
        if len(frames) == 0:
            raise InputError("no frames to encode")
        pv, (gt, gh, gw) = self.pixels(frames)
        enc = self.encode_pixels(pv, (gt, gh, gw), np.asarray(frames.pts_s, dtype=np.float64), skip_static)
        enc.encoded_frames = min(enc.encoded_frames, len(frames))  # an odd last frame was only padding
        return enc

    def token_motion(self, pv: torch.Tensor, thw: tuple[int, int, int]) -> torch.Tensor:
        """float32 [gt·(gh/2)·(gw/2)]: mean |Δ| of each merged token's normalised pixels vs the same token one
        temporal patch earlier (+inf for the first patch). Rows of ``pv`` come merge-window-contiguous, so a token's
        pixels are ``merge²`` consecutive rows."""
        gt, gh, gw = thw
        per = self.merge ** 2
        x = pv.float().reshape(gt, (gh * gw) // per, -1)
        motion = torch.full(x.shape[:2], float("inf"), device=pv.device)
        if gt > 1:
            motion[1:] = (x[1:] - x[:-1]).abs().mean(-1)
        return motion.reshape(-1)

    @torch.inference_mode()
    def encode_pixels(self, pv: torch.Tensor, thw: tuple[int, int, int], times: np.ndarray,
                      skip_static: float | None = None) -> EncodedVideo:
        """``pixel_values_videos`` [gt·gh·gw, C·2·14²] -> tokens (the tower, packed when ``fast_tower``)."""
        gt, gh, gw = thw
        import contextlib

        from .hf import vision_scope

        motion = self.token_motion(pv, thw) if skip_static is not None else None
        rows = torch.arange(gt, device=pv.device)
        if motion is not None:
            moving = (motion.view(gt, -1) >= skip_static).any(1)
            moving[0] = True
            rows = torch.nonzero(moving).squeeze(1)
        n_patch = gh * gw
        sub = pv if len(rows) == gt else pv.view(gt, n_patch, -1)[rows].reshape(-1, pv.shape[-1])
        grid = torch.tensor([[len(rows), gh, gw]], dtype=torch.long, device=self.device)
        with vision_scope(self.vision_tower(), compile_blocks=self.compile_tower) if self.fast_tower \
                else contextlib.nullcontext():
            out = self.model.model.get_video_features(sub.to(self.device, self.dtype), grid)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), 0)
        m = self.merge
        if len(rows) < gt:  # skipped patches reuse the last encoded patch's tokens
            src = torch.cumsum(moving.long(), 0) - 1  # index into the encoded patches
            feats = feats.view(len(rows), -1, feats.shape[-1])[src].reshape(-1, feats.shape[-1])
        tokens = VisualTokens.from_grid(feats, [(gh // m, gw // m)] * gt, motion=motion)
        spacing = float(np.mean(np.diff(times))) if len(times) > 1 else 0.5
        spacing = spacing if spacing > 0 else 0.5
        grid = torch.tensor([[gt, gh, gw]], dtype=torch.long, device=self.device)
        return EncodedVideo(tokens, {"grid": grid, "second_per_grid": self.temporal * spacing,
                             "pixel_values": pv if self.keep_pixels else None},
                            encoded_frames=int(len(rows)) * self.temporal)

    # --- prompt ---
    def prompt_text(self, question: str) -> tuple[str, str]:
        """Qwen2.5-VL's chat format around the video placeholder: (before, after)."""
        before = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        after = f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
        return before, after

    def full_inputs(self, encoded: EncodedVideo, question: str) -> dict:
        """The unreduced processed inputs, as transformers' processor would give them (for vanilla forward/generate)."""
        self.check_prompt(question)
        before, after = self.prompt_text(question)
        a, b = self._ids(before), self._ids(after)
        n = len(encoded.tokens)
        ids = torch.tensor([a + [self.video_token_id] * n + b], dtype=torch.long, device=self.device)
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[0, len(a): len(a) + n] = 2
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
               "video_grid_thw": encoded.extra["grid"],
               "second_per_grid_ts": torch.tensor([encoded.extra["second_per_grid"]], device=self.device),
               "_span": (len(a), len(a) + n)}
        if encoded.extra.get("pixel_values") is not None:
            out["pixel_values_videos"] = encoded.extra["pixel_values"].to(self.device)
        if "second_per_grid_ts" not in inspect.signature(type(self.model).forward).parameters:
            out.pop("second_per_grid_ts")  # Qwen2-VL: temporal ids are the patch index, not time
        return out

    def rope_index(self, inputs: dict) -> torch.Tensor:
        fn = self.model.model.get_rope_index
        params = inspect.signature(fn).parameters
        kw = {k: inputs[k] for k in ("mm_token_type_ids", "video_grid_thw", "second_per_grid_ts", "attention_mask")
              if k in params and k in inputs}
        pos, _ = fn(inputs["input_ids"], **kw)
        return pos  # [3, 1, L]

    @torch.inference_mode()
    def build_prompt(self, encoded: EncodedVideo, reduction: Reduction | None, question: str) -> Prompt:
        inputs = self.full_inputs(encoded, question)
        s, e = inputs["_span"]
        full_ids = inputs["input_ids"]
        pos = self.rope_index(inputs)
        next_position = int(pos.max()) + 1
        if reduction is None:
            feats, keep = encoded.tokens.features, None
            grid = encoded.tokens.positions
        else:
            feats, keep = reduction.features, reduction.keep_index.to(self.device)
            grid = reduction.positions
        if keep is not None:
            cols = torch.cat([torch.arange(s, device=self.device), s + keep,
                              torch.arange(e, full_ids.shape[1], device=self.device)])
            ids, pos = full_ids[:, cols], pos[:, :, cols]
        else:
            ids = full_ids
        embeds = self.embed(ids)
        k = feats.shape[0]
        embeds[0, s: s + k] = feats.to(embeds.dtype)
        hw = encoded.tokens.frame_hw[0].tolist()
        return Prompt(ids, embeds, pos, (s, s + k), grid, next_position, (int(hw[0]), int(hw[1])))
