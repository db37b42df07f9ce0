"""``ModelAdapter``: what vidsparse needs from a video LLM family, plus the shared prefill/decode loop.

An adapter owns everything model-specific: the frame resolution the tower wants, pixels -> ``VisualTokens``, the prompt
with one placeholder per kept visual token, the rotary positions of the kept tokens (M-RoPE for Qwen2.5-VL), and which
module is the language model. The loop here runs the language model on ``inputs_embeds`` with explicit positions and a
``Cache`` — positions never come from the cache length, so a cache that evicts entries (SnapKV, StreamingLLM) or an
in-LLM reducer that drops tokens leaves the rotary phases of later tokens untouched.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError
from ..types import Frames, Reduction, Selection, VideoInfo, VisualTokens


@dataclass
class EncodedVideo:
    """The vision tower's output for one video: ``tokens`` (merged, frame-major raster order; a Qwen "frame" is one
    temporal patch of 2 frames) and what the adapter needs to rebuild positions (``extra``)."""

    tokens: VisualTokens
    extra: dict = field(default_factory=dict)
    encoded_frames: int = 0  # frames the tower actually encoded (fewer when static patches were skipped)


@dataclass
class Prompt:
    """One prefill: ``input_ids`` int64 [1, L] (visual placeholders included), ``inputs_embeds`` [1, L, D],
    ``position_ids`` int64 [3, 1, L] (M-RoPE) or [1, L]; ``visual`` = (start, end) span of the visual tokens;
    ``visual_grid`` int64 [K, 3] (t, h, w) of each visual token; ``next_position``: position of the first generated
    token (later tokens add the step)."""

    input_ids: Tensor
    inputs_embeds: Tensor
    position_ids: Tensor
    visual: tuple[int, int]
    visual_grid: Tensor
    next_position: int
    frame_hw: tuple[int, int] | None = None


class ModelAdapter(ABC):
    """One per model family; instances wrap a loaded transformers model and its tokenizer."""

    model_types: tuple[str, ...] = ()
    temporal: int = 1  # frames per token frame (Qwen: 2 frames share one token grid)
    fixed_resolution: bool = False  # the tower's resolution cannot change (LLaVA-OneVision)
    supports_compile: bool = False  # ``compile_tower`` has an effect
    supports_pixel_motion: bool = False  # ``encode_video(skip_static=...)`` is implemented

    def __init__(self, model, tokenizer, device=None):
        self.keep_pixels = True  # keep pixel values for ``full_inputs`` (vanilla comparisons); Pipeline turns it off
        self.compile_tower = False
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        fwd = inspect.signature(type(self.llm_with_head()).forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"

    # ---- model-specific -------------------------------------------------------------------------------------------
    @abstractmethod
    def frame_size(self, info: VideoInfo, selection: Selection, tokens_per_frame: int | None) -> tuple[int, int]:
        """(height, width) to decode frames at for the tower; ``tokens_per_frame`` None: the model's default."""

    @abstractmethod
    def encode_video(self, frames: Frames, skip_static: float | None = None) -> EncodedVideo:
        """uint8 frames [T, H, W, 3] at ``frame_size`` -> visual tokens after the tower and projector.
        ``skip_static`` (adapters with ``supports_pixel_motion``): token frames whose pixels moved less than this
        are not encoded and reuse the previous tokens."""

    @abstractmethod
    def build_prompt(self, encoded: EncodedVideo, reduction: Reduction | None, question: str) -> Prompt:
        """The chat prompt with the kept visual tokens in place, positions as in the unreduced sequence."""

    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder-only language model (its layers hold the attention modules)."""

    def llm_with_head(self) -> torch.nn.Module:
        return self.model

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model().layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    # ---- shared ---------------------------------------------------------------------------------------------------
    def eos_token_ids(self) -> set[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else list(eos))
        return ids

    def forward_logits(self, prompt_or_ids, position_ids: Tensor, cache, embeds: bool) -> Tensor:
        """One forward of the language model + head; returns the logits of the last position, float32 [1, V]."""
        kwargs = {"position_ids": position_ids, self._cache_kw: cache, "use_cache": True}
        if embeds:
            kwargs["inputs_embeds"] = prompt_or_ids
        else:
            kwargs["input_ids"] = prompt_or_ids
        try:
            out = self.llm_with_head()(**kwargs, logits_to_keep=1)
        except TypeError:  # heads without logits_to_keep
            out = self.llm_with_head()(**kwargs)
        return out.logits[:, -1].float()

    def decode_position_ids(self, prompt: Prompt, step: int) -> Tensor:
        pos = torch.full((1, 1), prompt.next_position + step, dtype=torch.long, device=self.device)
        return pos.expand(3, 1, 1) if prompt.position_ids.dim() == 3 else pos

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.llm_with_head().get_input_embeddings()(input_ids)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_prompt(self, question: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty: ask something about the video")

