"""Shared fixtures: synthetic videos generated in the test session (nothing is downloaded)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:  # Triton reads this when a kernel is defined: without a GPU, kernels run in its interpreter at tiny sizes
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the thumbnail cache of the test session out of the user's home."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("VIDSPARSE_CACHE")
    os.environ["VIDSPARSE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VIDSPARSE_CACHE", None)
    else:
        os.environ["VIDSPARSE_CACHE"] = old


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A 3-minute synthetic video (8 fps, 192x108) with two needle captions, distractors, scene cuts, an object."""
    from vidsparse.video.synthetic import make_synthetic_video

    path = str(tmp_path_factory.mktemp("synth") / "synth.mp4")
    gt = make_synthetic_video(path, duration_s=180.0, fps=8.0, width=192, height=108, seed=3, needles=2,
                              distractors=2, objects=2, scene_len=(8.0, 25.0), text_len=(12.0, 16.0),
                              object_len=(8.0, 12.0))
    return path, gt


@pytest.fixture(scope="session")
def synth_index(synth):
    from vidsparse.video import build_index

    return build_index(synth[0], cache=False)


def indexed_frames(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    """Frames whose pixels encode their own index (R = i % 256, G = i // 256 * 32), so decoding can be checked."""
    out = []
    for i in range(n):
        f = np.zeros((h, w, 3), dtype=np.uint8)
        f[..., 0] = (i * 37) % 256
        f[..., 1] = (i * 11) % 256
        f[..., 2] = 128
        out.append(f)
    return out


def frame_id(img: np.ndarray, n: int) -> int:
    """Which of ``indexed_frames(n)`` the decoded ``img`` is (nearest colour)."""
    ref = np.array([[(i * 37) % 256, (i * 11) % 256] for i in range(n)], dtype=np.float64)
    c = img[..., :2].reshape(-1, 2).mean(0)
    return int(np.argmin(((ref - c) ** 2).sum(1)))
