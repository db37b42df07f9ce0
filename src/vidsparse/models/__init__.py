"""Model adapters (one per family) and loading. Importing this package loads no model code."""

from __future__ import annotations

import os

from ..errors import InputError, UnsupportedError

ADAPTERS = {
    "qwen2_5_vl": ("vidsparse.models.qwen2_5_vl", "QwenVLAdapter"),
    "qwen2_vl": ("vidsparse.models.qwen2_5_vl", "QwenVLAdapter"),
    "llava_onevision": ("vidsparse.models.llava_onevision", "LlavaOneVisionAdapter"),
}


def adapter_class(model_type: str):
    import importlib

    if model_type not in ADAPTERS:
        raise UnsupportedError(f"no vidsparse adapter for model type {model_type!r}; supported: "
                               f"{', '.join(sorted(ADAPTERS))}")
    mod, name = ADAPTERS[model_type]
    return getattr(importlib.import_module(mod), name)


def load_adapter(path: str, device: str | None = None, dtype: str | None = None):
    """Load a checkpoint (local directory, or a hub id already in the local cache) and wrap it in its adapter.

    ``device``: "cuda", "cpu", ... (default: CUDA when available); ``dtype``: "bfloat16", "float16", "float32"
    (default: bfloat16 on CUDA, float32 on CPU). Never downloads: hub ids resolve only from the local cache."""
    import sys

    import torch
    import transformers

    if not sys.stderr.isatty():  # progress bars only on a terminal (DESIGN rule 7)
        transformers.utils.logging.disable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}: bfloat16, float16 or float32")
    local_only = {"local_files_only": True}
    if not os.path.isdir(path) and os.sep in path and not path.count("/") == 1:
        raise InputError(f"model path {path} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(path, **local_only)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a model config from {path!r}: a local checkpoint directory (or a hub id "
                         f"already downloaded) is needed ({str(exc).splitlines()[0]})") from None
    cls = adapter_class(config.model_type)
    arch = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration"}[config.model_type]
    model = getattr(transformers, arch).from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa",
                                                        **local_only).to(device)
    tok = transformers.AutoTokenizer.from_pretrained(path, **local_only)
    return cls(model, tok)
