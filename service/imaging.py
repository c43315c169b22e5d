"""Pictures from model outputs: grids of images as uint8 arrays (numpy only, no torch)."""

from __future__ import annotations

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, 1, H, W] or [N, H, W] intensities in [0, 1] -> [N, H, W] uint8, rounded, clipped."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images[:, 0]
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def tile(images: np.ndarray, nrow: int, padding: int = 0, scale: int = 1) -> np.ndarray:
    """Lay N images out `nrow` per row (the last row may be short), each upscaled by the integer
    `scale` with nearest neighbour, `padding` black pixels between them: one [H', W'] uint8 array."""
    pixels = to_uint8(images)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = pixels.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * h + (rows - 1) * padding, cols * w + (cols - 1) * padding), dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[r * (h + padding): r * (h + padding) + h, c * (w + padding): c * (w + padding) + w] = image
    return grid
