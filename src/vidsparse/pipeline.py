"""``Pipeline``: a ``Recipe`` end to end on a video LLM — frames → tower → reducer → sparse prefill → compressed decode.

    pipe = Pipeline.from_pretrained("/models/Qwen2.5-VL-7B-Instruct", Recipe.from_dict({...}))
    answer = pipe.ask("talk.mp4", "What is written on the whiteboard?")
    answer.text, answer.stats.to_dict()

Every stage is timed (CUDA-synchronised at stage ends on a GPU) and counted in ``RunStats``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InputError, ResourceError, SpecError, UnsupportedError
from .recipe import Budget, Recipe
from .types import Selection


@dataclass
class RunStats:
    """Tokens after each stage and milliseconds per stage of one ``ask``.

    frames: frames decoded for the tower; encoded_frames: frames the tower actually encoded (fewer when
    ``static_patches`` skips static temporal patches); tower_tokens: visual tokens out of the tower (after the merger);
    visual_tokens: after the token reducer; prompt_tokens: the LLM's prefill length; llm_tokens_after_cut: prefill
    tokens after an in-LLM reducer's cut (== prompt_tokens without one); kv_entries: cache entries per layer (layer 0
    and the last) after generation; kv_mb: the KV cache's stored size after generation, MiB (a quantising cache's packed
    codes, scales and full-precision window); new_tokens: generated tokens. ms_*: decode (video), selection, vision,
    reduction, prefill (to the first logits), first_token (everything up to the first generated token), generate (all
    new tokens), estimate (the attention pattern's estimation inside the prefill: GPU time between CUDA events on a GPU,
    host time on the CPU). attention_density: mean fraction of causal blocks computed over sparse prefill calls (1.0
    if dense)."""

    frames: int = 0
    encoded_frames: int = 0
    tower_tokens: int = 0
    visual_tokens: int = 0
    prompt_tokens: int = 0
    llm_tokens_after_cut: int = 0
    kv_entries: tuple[int, int] = (0, 0)
    kv_mb: float = 0.0
    new_tokens: int = 0
    ms_selection: float = 0.0
    ms_decode: float = 0.0
    ms_vision: float = 0.0
    ms_reduction: float = 0.0
    ms_prefill: float = 0.0
    ms_first_token: float = 0.0
    ms_generate: float = 0.0
    ms_estimate: float = 0.0
    attention_density: float = 1.0
    peak_memory_mb: float = 0.0
    device: str = ""
    frame_size: tuple[int, int] = (0, 0)
    times: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        d["times"] = [round(float(t), 3) for t in self.times]
        return d


@dataclass
class Answer:
    text: str
    token_ids: list
    stats: RunStats
    selection: Selection | None = None

    def to_dict(self) -> dict:
        return {"answer": self.text, "stats": self.stats.to_dict()}


def uniform_times(info, frames: int, fps: float = 2.0) -> np.ndarray:
    """qwen-vl-utils' sampling: round(duration·fps) frames rounded to even, clamped to [4, ``frames``], spread evenly
    over the video (PTS seconds)."""
    n = int(round(info.duration_s * fps / 2.0)) * 2
    n = max(min(n, frames, max(1, int(info.duration_s * info.avg_fps))), min(4, frames))
    last = info.start_s + max(0.0, info.duration_s - 1.0 / max(info.avg_fps, 1e-6))
    t = np.linspace(info.start_s, last, n)
    return np.unique(np.round(t, 6))


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Pipeline:
    """Runs one ``Recipe`` on one loaded model (``adapter``: a ``models.ModelAdapter``)."""

    def __init__(self, adapter, recipe: Recipe | None = None, max_new_tokens: int = 64, backend: str = "auto",
                 vanilla_fps: float = 2.0, compile_tower: bool = False):
        from .registry import FRAMES, INLLM, KV, PATTERNS, TOKENS, parse_spec

        self.adapter = adapter
        self.recipe = recipe or Recipe()
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        self.backend = backend
        self.vanilla_fps = vanilla_fps
        if compile_tower:  # torch.compile the packed tower's blocks (pays ~15 s once per process on an H100)
            if not adapter.supports_compile:
                raise UnsupportedError(f"{type(adapter).__name__} has no compiled tower path")
            adapter.compile_tower = True
        r = self.recipe
        if r.frames is not None:
            FRAMES.get(parse_spec(r.frames)[0])  # fail early on an unknown name
        self.reducer = self.inllm = self.pattern = self.kv = None
        if r.tokens is not None:
            name = parse_spec(r.tokens)[0]
            if name in INLLM.names():
                self.inllm = INLLM.from_spec(r.tokens)
            else:
                self.reducer = TOKENS.from_spec(r.tokens)
                if self.reducer.capabilities.get("pixel_motion") and not adapter.supports_pixel_motion:
                    raise UnsupportedError(f"{self.reducer.name} needs pixel motion measured before the tower, which "
                                           f"{type(adapter).__name__} does not provide")
        if r.attention is not None:
            over = {"density": r.budget.density} if r.budget.density is not None else {}
            cls = PATTERNS.get(parse_spec(r.attention)[0])
            import dataclasses

            names = {f.name for f in dataclasses.fields(cls)}
            self.pattern = PATTERNS.from_spec(r.attention, **{k: v for k, v in over.items() if k in names})
        if r.kv is not None:
            self.kv = KV.from_spec(r.kv)

    @classmethod
    def from_pretrained(cls, path: str, recipe: Recipe | None = None, device: str | None = None,
                        dtype: str | None = None, **kwargs) -> Pipeline:
        from .models import load_adapter

        return cls(load_adapter(path, device=device, dtype=dtype), recipe, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    def _sync(self):
        import torch

        if str(self.adapter.device).startswith("cuda"):
            torch.cuda.synchronize(self.adapter.device)

    def select(self, video: str, question: str):
        """Choose frame times: the recipe's selector (query = the question), else qwen-vl-utils' uniform sampling."""
        from .video.probe import probe

        r = self.recipe
        if r.frames is None:
            info, packets = probe(video)
            times = uniform_times(info, r.budget.frames, self.vanilla_fps)
            k = len(times)
            sel = Selection(times, np.arange(k), np.zeros(k, dtype=np.int64), np.full(k, np.nan), "uniform-fps")
            return sel, (info, packets)
        from .moments import find_moments
        from .registry import FRAMES, parse_spec

        selector = FRAMES.get(parse_spec(r.frames)[0])
        needs_query = selector.capabilities.get("query") in ("required", "optional")
        moments, index = find_moments(video, r.budget, frames=r.frames, query=question if needs_query else None,
                                      scorer=r.scorer, progress=getattr(self, "_progress", False))
        return moments.selection, (index.info, index.packets)

    def ask(self, video: str, question: str, progress: bool = False) -> Answer:
        """``progress``: one status line per stage on stderr when it is a terminal (quiet in pipes)."""
        import sys

        self._progress = bool(progress) and sys.stderr.isatty()
        try:
            return self._ask(video, question)
        except (InputError, SpecError, UnsupportedError, ResourceError):
            raise
        except Exception as exc:
            if _is_oom(exc):
                import torch

                torch.cuda.empty_cache()
                raise ResourceError(f"out of GPU memory ({exc.__class__.__name__}); lower the budget: fewer frames "
                                    "(--budget) or fewer visual tokens (--tokens N, or a token reducer)") from None
            raise

    def _stage(self, msg: str) -> None:
        if getattr(self, "_progress", False):
            import sys

            print(f"\r\033[K{msg}", end="" if msg else "\r", file=sys.stderr, flush=True)

    def _ask(self, video: str, question: str) -> Answer:
        import torch

        from .video.reader import VideoReader

        ad = self.adapter
        ad.check_prompt(question)
        if not os.path.isfile(video):
            raise InputError(f"video {video} does not exist")
        st = RunStats(device=str(ad.device))
        if str(ad.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(ad.device)
        b = self.recipe.budget
        t_start = time.perf_counter()
        self._stage("selecting frames…")
        sel, probed = self.select(video, question)
        info = probed[0]
        t1 = time.perf_counter()
        st.ms_selection = (t1 - t_start) * 1e3
        tpf = self._tower_tokens_per_frame(len(sel), b)
        if tpf is None and self.reducer is None and self.recipe.frames is not None and np.any(sel.tokens > 0):
            # the selector's per-frame resolution; one grid per video in Qwen/LLaVA, so its mean
            tpf = max(1, int(np.mean(sel.tokens)))
        size = ad.frame_size(info, sel, tpf)
        self._stage(f"decoding {len(sel)} frames at {size[1]}x{size[0]}…")
        frames = VideoReader(video, _probed=probed).read_at(sel.times, size=size)
        t2 = time.perf_counter()
        st.ms_decode = (t2 - t1) * 1e3
        st.frames, st.frame_size, st.times = len(frames), tuple(size), list(frames.pts_s)

        self._stage(f"encoding {len(frames)} frames…")
        keep, ad.keep_pixels = ad.keep_pixels, False  # pixels are not needed after the tower: not held in prefill
        try:
            pixel_motion = self.reducer is not None and self.reducer.capabilities.get("pixel_motion")
            enc = ad.encode_video(frames, skip_static=self.reducer.tau if pixel_motion else None)
        finally:
            ad.keep_pixels = keep
        self._sync()
        t3 = time.perf_counter()
        st.ms_vision = (t3 - t2) * 1e3
        st.tower_tokens = len(enc.tokens)
        st.encoded_frames = enc.encoded_frames

        if self.reducer is None and b.tokens is not None and len(enc.tokens) > b.tokens:
            why = ("at its fixed resolution" if ad.fixed_resolution
                   else "even at the smallest resolution the model takes")
            raise InputError(f"{type(ad.model).__name__} encodes {len(enc.tokens)} visual tokens for {len(frames)} "
                             f"frames {why}, above the budget of {b.tokens}: add a token reducer (--tokens pooling), "
                             "use fewer frames (--budget) or raise the token budget")
        red = None
        if self.reducer is not None and b.tokens is not None and b.tokens < len(enc.tokens):
            with torch.inference_mode():
                red = self.reducer.reduce(enc.tokens, b.tokens)
            self._sync()
        t4 = time.perf_counter()
        st.ms_reduction = (t4 - t3) * 1e3
        st.visual_tokens = len(red) if red is not None else len(enc.tokens)

        prompt = ad.build_prompt(enc, red, question)
        st.prompt_tokens = int(prompt.input_ids.shape[1])
        self._stage(f"prefill of {st.prompt_tokens} tokens…")
        cache = self.kv.make_cache() if self.kv is not None else _dynamic_cache()
        ids, logits, pre = self._prefill(prompt, cache, st)
        self._sync()
        t5 = time.perf_counter()
        st.ms_prefill = (t5 - t4) * 1e3
        st.ms_first_token = (t5 - t_start) * 1e3
        self._stage("generating…")
        tokens = self._decode(prompt, cache, logits)
        self._stage("")
        self._sync()
        st.ms_generate = (time.perf_counter() - t5) * 1e3
        st.new_tokens = len(tokens)
        st.kv_entries = (_entries(cache, 0), _entries(cache, ad.num_layers - 1))
        from .kv.base import cache_nbytes

        st.kv_mb = cache_nbytes(cache) / 2**20
        if str(ad.device).startswith("cuda"):
            st.peak_memory_mb = torch.cuda.max_memory_allocated(ad.device) / 2**20
        else:
            import resource

            st.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        text = ad.tokenizer.decode(tokens, skip_special_tokens=True)
        return Answer(text, tokens, st, sel)

    def _tower_tokens_per_frame(self, frames: int, b: Budget) -> int | None:
        """Tower resolution: with a post-tower reducer the tower sees the model's default resolution and the reducer
        cuts to ``budget.tokens``; without one the resolution itself meets ``budget.tokens``."""
        if b.tokens is None or self.reducer is not None:
            return None
        per = -(-frames // self.adapter.temporal)
        return max(1, b.tokens // max(per, 1))

    def _prefill(self, prompt, cache, st: RunStats):
        import torch

        from .models.hf import attention_scope, estimate_ms

        ad = self.adapter
        observers, cut = [], None
        if self.kv is not None and getattr(self.kv, "needs_queries", False):
            observers.append(cache)
        if self.inllm is not None:
            cut = self.inllm.plan(prompt.visual, int(prompt.input_ids.shape[1]), ad.num_layers, prompt.visual_grid)
            observers.append(cut)
        use_scope = self.pattern is not None or observers
        meta = None
        if self.pattern is not None:
            from .attention.patterns.base import SeqMeta

            hw = prompt.frame_hw
            if cut is not None:
                # after an in-LLM cut the sequence no longer has the prompt's layout: no span or frame structure
                meta = SeqMeta()
            else:
                regular = (hw and prompt.visual_grid is not None and len(prompt.visual_grid) % (hw[0] * hw[1]) == 0
                           and self.reducer is None)
                meta = SeqMeta(visual=prompt.visual, tokens_per_frame=hw[0] * hw[1] if regular else None,
                               frame_hw=hw)
        with contextlib.ExitStack() as stack, torch.inference_mode():
            scope = None
            if use_scope:
                first = self.pattern.from_layer if self.pattern is not None else 0
                layers = set(range(first, ad.num_layers)) if first else None
                scope = stack.enter_context(attention_scope(ad.language_model(), pattern=self.pattern, meta=meta,
                                                            observers=observers, layers=layers, backend=self.backend,
                                                            sync_timing=False))
            if cut is not None:
                stack.enter_context(cut.installed(ad.decoder_layers()))
            logits = ad.forward_logits(prompt.inputs_embeds, prompt.position_ids, cache, embeds=True)
        st.llm_tokens_after_cut = cut.current if cut is not None else st.prompt_tokens
        if scope is not None:
            n = scope.stats["sparse_calls"]
            sub = scope.stats.get("subset_calls", 0)
            if n:
                st.attention_density = float(scope.stats["density_sum"]) / n  # the run's one sync for it
            elif sub:  # ZipVL: fraction of keys kept, over the layers that applied it
                st.attention_density = scope.stats["key_fraction_sum"] / sub
            st.ms_estimate = estimate_ms(scope)
        return prompt.input_ids, logits, scope

    def _decode(self, prompt, cache, logits) -> list[int]:
        import torch

        from .models.hf import attention_scope

        ad = self.adapter
        eos = ad.eos_token_ids()
        out: list[int] = []
        nxt = logits.argmax(-1, keepdim=True)
        with contextlib.ExitStack() as stack, torch.inference_mode():
            if self.pattern is not None or self.inllm is not None or self.kv is not None:
                # decode is dense either way; vidsparse's function also serves caches whose layers differ in length
                stack.enter_context(attention_scope(ad.language_model(), backend=self.backend, cache=cache))
            for step in range(self.max_new_tokens):
                tok = int(nxt.item())
                out.append(tok)
                if tok in eos or step == self.max_new_tokens - 1:
                    break
                logits = ad.forward_logits(nxt, ad.decode_position_ids(prompt, step), cache, embeds=False)
                nxt = logits.argmax(-1, keepdim=True)
        return out


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _entries(cache, layer: int) -> int:
    """The entries a layer of the cache holds (a quantising layer's quantised tokens and its window)."""
    try:
        return int(cache.layers[layer].get_seq_length())
    except (AttributeError, IndexError):
        return 0
