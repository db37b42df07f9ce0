"""Weight-free frame descriptors: a colour histogram and low-frequency DCT of a small grey image.

Both are computed from thumbnails, so describing a 1-hour index takes milliseconds and needs no model."""

from __future__ import annotations

import numpy as np

HIST_BINS = 4  # per RGB channel -> 64 joint bins (the code below bins by >> 6)
DCT_SIDE = 8  # top-left 8x8 coefficients of a 32x32 grey image, DC dropped -> 63


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))


def describe(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 127], each row L2-normalised.

    First 64 dims: square root of the joint RGB histogram (Hellinger embedding, so cosine ~ Bhattacharyya overlap);
    last 63: low-frequency DCT of the grey image (layout, edges). The halves weigh equally."""
    from scipy.fft import dctn

    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    t = len(frames)
    h, w = frames.shape[1:3]
    if h % 32 == 0 and w % 32 == 0:
        # Area pooling by reshape: the common case (64x64 thumbnails) in one vectorised step.
        fh, fw = h // 32, w // 32
        acc = np.zeros((t, 32, 32, 3), dtype=np.uint32 if fh * fw > 256 else np.uint16)
        for dy in range(fh):  # strided adds beat numpy's reduction over small axes by ~7x
            for dx in range(fw):
                acc += frames[:, dy::fh, dx::fw]
        small = (acc // (fh * fw)).astype(np.uint8)
    else:
        small = np.stack([_resize(f, 32) for f in frames]) if t else np.zeros((0, 32, 32, 3), np.uint8)
    small = np.asarray(small, dtype=np.uint8)
    q = small >> 6  # 4 bins per channel
    codes = ((q[..., 0] << 4) | (q[..., 1] << 2) | q[..., 2]).reshape(t, -1)
    nb = HIST_BINS**3
    flat = (codes.astype(np.int32) + (np.arange(t, dtype=np.int32) * nb)[:, None]).reshape(-1)
    hist = np.bincount(flat, minlength=t * nb).reshape(t, nb).astype(np.float32)
    hist = np.sqrt(hist / max(codes.shape[1], 1))
    grey = small.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    coef = dctn(grey - 128.0, axes=(1, 2), norm="ortho")[:, :DCT_SIDE, :DCT_SIDE].reshape(t, -1)[:, 1:]
    coef /= np.maximum(np.linalg.norm(coef, axis=1, keepdims=True), 1e-6)
    hist /= np.maximum(np.linalg.norm(hist, axis=1, keepdims=True), 1e-6)
    out = np.concatenate([hist, coef], axis=1) / np.sqrt(2.0)
    return out.astype(np.float32)
