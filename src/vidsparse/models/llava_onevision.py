"""LLaVA-OneVision adapter on transformers' ``LlavaOnevisionForConditionalGeneration``.

Frames are resized to the SigLIP tower's square input (384 px for the released checkpoints), normalised with mean =
std = 0.5; each frame gives 27×27 = 729 patch features, projected and bilinearly pooled to 14×14 = 196 tokens by the
model's own ``get_video_features``, followed by one ``image_newline`` token per video. The reducers see the frame
tokens; the newline token always stays. Positions are 1-D: kept tokens keep their index in the unreduced sequence.
The tower's resolution is fixed, so a visual-token budget below T×196 needs a token reducer.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..types import Frames, Reduction, Selection, VideoInfo, VisualTokens
from .base import EncodedVideo, ModelAdapter, Prompt


class LlavaOneVisionAdapter(ModelAdapter):
    model_types = ("llava_onevision",)
    fixed_resolution = True
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, model, tokenizer, device=None):
        super().__init__(model, tokenizer, device)
        cfg = model.config
        self.size = int(cfg.vision_config.image_size)
        side = self.size // int(cfg.vision_config.patch_size)
        self.side = -(-side // 2)  # after the model's 2x2 bilinear pooling
        self.video_token_id = int(cfg.video_token_id)

    def language_model(self):
        return self.model.model.language_model

    def frame_size(self, info: VideoInfo, selection: Selection, tokens_per_frame: int | None) -> tuple[int, int]:
        return self.size, self.size

    def pixels(self, frames: Frames) -> torch.Tensor:
        if frames.data.shape[1:3] != (self.size, self.size):
            raise InputError(f"LLaVA-OneVision frames must be {self.size}x{self.size}, got "
                             f"{frames.data.shape[2]}x{frames.data.shape[1]}")
        x = torch.from_numpy(np.ascontiguousarray(frames.data)).float().mul_(1.0 / 255.0)
        x = (x - torch.tensor(self.mean)) / torch.tensor(self.std)
        return x.permute(0, 3, 1, 2)[None].contiguous()  # [1, T, 3, S, S]

    @torch.inference_mode()
    def encode_video(self, frames: Frames, skip_static: float | None = None) -> EncodedVideo:
        if skip_static is not None:
            from ..errors import UnsupportedError

            raise UnsupportedError("LLaVA-OneVision encodes every frame: pixel-motion skipping (static_patches) needs "
                                   "a tower that never attends across frames, such as Qwen2.5-VL's")
        if len(frames) == 0:
            raise InputError("no frames to encode")
        pv = self.pixels(frames)
        cfg = self.model.config
        out = self.model.model.get_video_features(pv.to(self.device, self.dtype),
                                                  vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = getattr(out, "pooler_output", out)
        feats = feats[0] if feats.dim() == 3 else feats
        n_body = len(frames) * self.side * self.side
        body = feats[:n_body]
        # transformers >= 5.2x appends the video's newline token in get_video_features, earlier ones in forward
        newline = feats[n_body:] if feats.shape[0] > n_body else self.model.model.image_newline[None].to(feats)
        tokens = VisualTokens.from_grid(body, [(self.side, self.side)] * len(frames))
        return EncodedVideo(tokens, {"newline": newline, "pixel_values": pv if self.keep_pixels else None},
                            encoded_frames=len(frames))

    def prompt_text(self, question: str) -> tuple[str, str]:
        return "<|im_start|>user ", f"\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def full_inputs(self, encoded: EncodedVideo, question: str) -> dict:
        self.check_prompt(question)
        before, after = self.prompt_text(question)
        a, b = self._ids(before), self._ids(after)
        n = len(encoded.tokens) + 1
        ids = torch.tensor([a + [self.video_token_id] * n + b], dtype=torch.long, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "_span": (len(a), len(a) + n),
                **({"pixel_values_videos": encoded.extra["pixel_values"].to(self.device)}
                   if encoded.extra.get("pixel_values") is not None else {})}

    @torch.inference_mode()
    def build_prompt(self, encoded: EncodedVideo, reduction: Reduction | None, question: str) -> Prompt:
        inputs = self.full_inputs(encoded, question)
        s, e = inputs["_span"]
        full_ids = inputs["input_ids"]
        n_full = full_ids.shape[1]
        if reduction is None:
            feats, keep = encoded.tokens.features, torch.arange(len(encoded.tokens), device=self.device)
            grid = encoded.tokens.positions
        else:
            feats, keep = reduction.features, reduction.keep_index.to(self.device)
            grid = reduction.positions
        cols = torch.cat([torch.arange(s, device=self.device), s + keep, torch.tensor([e - 1], device=self.device),
                          torch.arange(e, n_full, device=self.device)])
        ids = full_ids[:, cols]
        embeds = self.embed(ids)
        k = feats.shape[0]
        embeds[0, s: s + k] = feats.to(embeds.dtype)
        embeds[0, s + k] = encoded.extra["newline"][0].to(embeds.dtype)
        pos = cols[None].clone()
        return Prompt(ids, embeds, pos, (s, s + k), grid, n_full, (self.side, self.side))
