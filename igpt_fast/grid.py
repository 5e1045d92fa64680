"""PNG grids of small images: samples, and completion figures (one row per source image)."""

from __future__ import annotations

import os

import numpy as np


def image_grid(images: np.ndarray, columns: int, scale: int = 1, pad: int = 2, background: int = 255) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H*scale+pad)+pad, columns*(W*scale+pad)+pad, 3] picture, tiles
    upscaled by `scale` with nearest neighbour so 16- or 32-pixel images stay crisp."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if columns < 1 or scale < 1:
        raise ValueError(f"columns and scale must be >= 1, got {columns} and {scale}")
    n, h, w, _ = images.shape
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    rows = max(1, -(-n // columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    return grid


def save_png(picture: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    Image.fromarray(picture).save(path, format="PNG")


def default_scale(side: int) -> int:
    """Upscale factor that makes a tile about 64 pixels wide."""
    return max(1, 64 // side)
