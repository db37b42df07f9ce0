"""``VidsparseLMM``: lmms-eval's ``lmms`` interface over ``vidsparse.Pipeline`` (one video per request)."""

from __future__ import annotations

import os

from lmms_eval.api.model import lmms

from ....errors import InputError


def _visual_path(visuals) -> str:
    """The video file of a request: lmms-eval tasks hand a list of paths (or dicts with a path)."""
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    for v in items:
        if isinstance(v, dict):
            v = v.get("path") or v.get("video") or v.get("video_path")
        if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
            return str(v)
    raise InputError("vidsparse answers questions about one video file per request; this request has "
                     f"{[type(v).__name__ for v in items]}")


class VidsparseLMM(lmms):
    """model: checkpoint directory or cached hub id; recipe: recipe file; frames/tokens/attention/kv: inline specs;
    budget: frames; visual_tokens: budget.tokens; density: budget.density; max_new_tokens; device; dtype."""

    def __init__(self, model: str = "", recipe: str | None = None, frames: str | None = None,
                 tokens: str | None = None, attention: str | None = None, kv: str | None = None,
                 scorer: str | None = None, budget: int | None = None, visual_tokens: int | None = None,
                 density: float | None = None, max_new_tokens: int = 16, device: str | None = None,
                 dtype: str | None = None, pipeline=None, **unused):
        super().__init__()
        from ....cli import recipe_from_flags
        from ....pipeline import Pipeline

        r = recipe_from_flags(recipe, frames, tokens, attention, kv, scorer,
                              int(budget) if budget is not None else None,
                              int(visual_tokens) if visual_tokens is not None else None,
                              float(density) if density is not None else None, None)
        if pipeline is not None:
            self.pipeline = pipeline
        else:
            if not model:
                raise InputError("model_args needs model=PATH (a checkpoint directory or a cached hub id)")
            self.pipeline = Pipeline.from_pretrained(str(model), r, device=device, dtype=dtype,
                                                     max_new_tokens=int(max_new_tokens))
        self.recipe = r
        self.stats: list[dict] = []

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            video = _visual_path(doc_to_visual(self.task_dict[task][split][doc_id]))
            ans = self.pipeline.ask(video, context)
            text = ans.text
            for stop in (gen_kwargs or {}).get("until", []) or []:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self.stats.append({"doc_id": doc_id, "task": task, **ans.stats.to_dict()})
            out.append(text)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("vidsparse generates answers (generate_until); loglikelihood tasks are not served")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vidsparse answers single-round video questions")
