"""Latent draws, class vectors and walks between them (numpy only).

Every random choice comes from the request's seed, so the same parameters and seed give the same
images. For a seed s: z = default_rng(s).standard_normal((n, latent)); random classes (conditional
/sample) come from a second stream, default_rng([s, 1]). Frame 0 of /interpolate?seed=s is therefore
image 0 of /sample?seed=s. Truncation t scales z toward the mean (z * t, StyleGAN's psi at a zero
mean): deterministic, continuous along walks, and t = 1 is the model's own distribution.
"""

from __future__ import annotations

import os
import random

import numpy as np

MAX_SEED = 2**32 - 1

# Seeds are not secrets: one generator seeded from the OS beats a getrandom() call per request.
_seeds = random.Random()
os.register_at_fork(after_in_child=_seeds.seed)  # a forked worker must not repeat its parent's seeds


def new_seed() -> int:
    """A seed for a request that gave none."""
    return _seeds.getrandbits(32)


def latents(seed: int, n: int, latent_dim: int, truncation: float = 1.0) -> np.ndarray:
    """z [n, latent_dim], float32, standard normal scaled by `truncation` (0 < t <= 1): a smaller t
    keeps z nearer the mode, trading diversity for fidelity."""
    z = np.random.default_rng(seed).standard_normal((n, latent_dim), dtype=np.float32)
    return z if truncation == 1.0 else z * np.float32(truncation)


def random_classes(seed: int, n: int, num_classes: int) -> np.ndarray:
    """n class indices drawn uniformly, from a stream independent of z."""
    return np.random.default_rng([seed, 1]).integers(0, num_classes, n)


def one_hot(classes: np.ndarray | list[int], num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(classes)]


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation [T, D] between vectors a and b [D]: the path keeps the norm a Gaussian z
    typically has, where a straight line passes through the low-norm middle (blurry, atypical samples)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-12)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:  # (anti)parallel: the sphere gives no unique path; the line is as good
        return linear(a, b, t)
    t = t[:, None]
    path = (np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)
    return path.astype(np.float32)


def linear(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = t[:, None].astype(np.float32)
    return ((1 - t) * a + t * b).astype(np.float32)


def walk(start: np.ndarray, end: np.ndarray, steps: int, method: str) -> np.ndarray:
    """`steps` points from start to end inclusive, [steps, D]."""
    t = np.linspace(0.0, 1.0, steps)
    return slerp(start, end, t) if method == "slerp" else linear(start, end, t)
