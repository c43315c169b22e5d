"""Pictures of a run: snapshot grids, the animated progress GIF and the loss curves (numpy, Pillow and
matplotlib; the service draws its own pictures, so training depends on no part of it but the manifest)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from training.atomic import write_bytes_atomic

GRID_PADDING = 2
GRID_SCALE = 2


def grid_pixels(images: np.ndarray, nrow: int, padding: int = GRID_PADDING, scale: int = GRID_SCALE) -> np.ndarray:
    """[N, 1, H, W] intensities in [0, 1] -> one [H', W'] uint8 picture: `nrow` images a row (the last row
    may be short), each upscaled `scale` times (nearest neighbour), `padding` black pixels between them."""
    pixels = np.clip(np.rint(np.asarray(images, dtype=np.float32)[:, 0] * 255.0), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)  # [N, H * scale, W * scale]
    n, h, w = pixels.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    cells = np.zeros((rows * cols, h + padding, w + padding), dtype=np.uint8)  # each image, its gap below and right
    cells[:n, :h, :w] = pixels
    grid = cells.reshape(rows, cols, h + padding, w + padding).transpose(0, 2, 1, 3)
    grid = grid.reshape(rows * (h + padding), cols * (w + padding))
    return grid[:grid.shape[0] - padding, :grid.shape[1] - padding]  # no gap after the last row and column


def save_grid(images: np.ndarray, path: Path, nrow: int = 10) -> None:
    """[N, 1, 28, 28] intensities in [0, 1] -> one PNG grid."""
    buffer = io.BytesIO()
    Image.fromarray(grid_pixels(images, nrow)).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def save_progress_gif(frames: list[Path], path: Path, frame_ms: int = 250, hold_last_ms: int = 1500,
                      reduce: int = 1) -> None:
    """An animated GIF of the per-epoch snapshots, looping, pausing on the last epoch; `reduce` shrinks
    each frame by that integer factor."""
    images = [Image.open(frame).convert("L").reduce(reduce) for frame in frames]
    if not images:
        return
    durations = [frame_ms] * (len(images) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    write_bytes_atomic(path, buffer.getvalue())


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    _pyplot().close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def save_loss_curves(history: list[dict], path: Path, title: str) -> None:
    """One panel per loss term against epoch, from the rows of metrics.jsonl."""
    plt = _pyplot()

    skip = {"epoch", "step", "seconds", "images_per_s"}
    terms = [k for k in history[0] if k not in skip and isinstance(history[0][k], (int, float))]
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3), squeeze=False)
    for ax, term in zip(axes[0], terms):
        ax.plot(epochs, [row.get(term) for row in history], marker="o", markersize=3)
        ax.set_title(term)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path)


TRUNCATION_PANELS = (("confidence_ratio", "confidence / real digits'"), ("fid_ratio", "FID / floor"),
                     ("recall_ratio", "recall / real-vs-real"))


def save_truncation_plot(sweeps: dict[str, list[dict]], path: Path) -> None:
    """Fidelity against diversity: each model's confidence, FID and recall (relative to real digits)
    against the truncation t, one line per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRUNCATION_PANELS), figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, TRUNCATION_PANELS):
        for name, rows in sweeps.items():
            ax.plot([r["truncation"] for r in rows], [r[key] for r in rows], marker="o", markersize=3, label=name)
        ax.set_title(label)
        ax.set_xlabel("truncation t (z scaled by t)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
