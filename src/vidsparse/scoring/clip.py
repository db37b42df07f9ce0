"""``clip``: CLIP/SigLIP image–text (or image–image) similarity with transformers, from a local checkpoint only.

The checkpoint directory comes from ``clip:path=DIR`` or ``$VIDSPARSE_CLIP_PATH``; nothing is downloaded.
Pre-processing (resize, centre crop, normalise) is done here from the checkpoint's ``preprocessor_config.json``, so
no torchvision-backed image processor is needed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import InputError, UnsupportedError
from ..registry import SCORERS
from ..types import Frames, Query

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def configured_path() -> str | None:
    return os.environ.get("VIDSPARSE_CLIP_PATH") or None


@SCORERS.register("clip")
@dataclass
class ClipScorer:
    """Cosine of image and query embeddings mapped to [0, 1] as (cos + 1) / 2. Text queries use the text tower;
    image queries the image tower. ``device``: "cpu" or "cuda"."""

    path: str = ""
    device: str = "cpu"
    batch: int = 32
    input: ClassVar[str] = "pixels"
    expensive: ClassVar[bool] = False
    frame_size: tuple[int, int] | None = field(default=None, init=False)
    _loaded: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        self.path = self.path or configured_path() or ""
        if not self.path:
            raise InputError("the clip scorer needs local weights: clip:path=DIR or VIDSPARSE_CLIP_PATH=DIR")
        if not Path(self.path, "config.json").is_file():
            raise InputError(f"{self.path} is not a transformers checkpoint directory (no config.json)")
        pre = Path(self.path, "preprocessor_config.json")
        cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self._mean = np.asarray(cfg.get("image_mean", CLIP_MEAN), np.float32)
        self._std = np.asarray(cfg.get("image_std", CLIP_STD), np.float32)
        side = self._image_side(cfg)
        self.frame_size = None if side is None else (side, side)

    def _image_side(self, cfg: dict) -> int | None:
        crop = cfg.get("crop_size") or cfg.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge")
        if crop:
            return int(crop)
        conf = json.loads(Path(self.path, "config.json").read_text())
        return int((conf.get("vision_config") or {}).get("image_size", 224))

    def _load(self):
        if not self._loaded:
            try:
                import torch
                from transformers import AutoModel, AutoTokenizer
            except ImportError:
                raise UnsupportedError("the clip scorer needs torch and transformers: pip install 'vidsparse[clip]'") from None
            model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self._loaded = (torch, model, tok)
        return self._loaded

    def _pixels(self, images: np.ndarray):
        torch, model, _ = self._load()
        side = self.frame_size[0]
        if images.shape[1:3] != (side, side):
            from PIL import Image

            images = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in images])
        x = (images.astype(np.float32) / 255.0 - self._mean) / self._std
        return torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)

    def _features(self, out):
        return out if not hasattr(out, "pooler_output") else out.pooler_output

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        torch, model, _ = self._load()
        outs = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch):
                f = self._features(model.get_image_features(pixel_values=self._pixels(images[s : s + self.batch])))
                outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)

    def embed_text(self, text: str) -> np.ndarray:
        torch, model, tok = self._load()
        with torch.inference_mode():
            ids = tok([text], padding=True, truncation=True, return_tensors="pt").to(self.device)
            f = self._features(model.get_text_features(**ids))
            return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()[0]

    def score(self, frames: Frames, query: Query) -> np.ndarray:
        if query.empty:
            raise InputError("the clip scorer needs a query text or image")
        q = self.embed_images(query.image[None])[0] if query.image is not None else self.embed_text(query.text)
        return np.clip((self.embed_images(frames.data) @ q + 1.0) / 2.0, 0.0, 1.0)
