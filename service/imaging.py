"""Pictures from model outputs: grids, PNG, base64 and GIF (numpy and Pillow, no torch)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


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


def png_bytes(pixels: np.ndarray) -> bytes:
    """One 8-bit greyscale PNG of a [H, W] uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_grid(images: np.ndarray, nrow: int, scale: int = 1) -> bytes:
    """The n images as one PNG, `nrow` per row, each upscaled `scale` times with nearest neighbour."""
    return png_bytes(tile(images, nrow, 0, scale))


def png_list(images: np.ndarray, scale: int = 1) -> list[str]:
    """One base64 PNG per image (the JSON format)."""
    return [base64.b64encode(png_bytes(tile(image[None], 1, 0, scale))).decode("ascii") for image in images]


def gif_bytes(images: np.ndarray, scale: int = 1, frame_ms: int = 120) -> bytes:
    """An animated, looping GIF with one frame per image."""
    frames = [Image.fromarray(tile(image[None], 1, 0, scale)) for image in images]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buffer.getvalue()
