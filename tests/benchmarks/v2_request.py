"""The V2 request every serving benchmark sends: binary infer of cgan, `images` z (seed 3) and one-hot 3s
as raw tensor data after a JSON header, the output asked for as binary data."""

from __future__ import annotations

import json

import numpy as np


def binary_infer(images: int = 1, latent_dim: int = 64, num_classes: int = 10) -> tuple[bytes, bytes]:
    """The JSON header and the whole body (header, then z and y as little-endian float32)."""
    z = np.random.default_rng(3).standard_normal((images, latent_dim), dtype=np.float32)
    y = np.eye(num_classes, dtype=np.float32)[[3] * images]
    header = json.dumps({"inputs": [
        {"name": "z", "shape": [images, latent_dim], "datatype": "FP32", "parameters": {"binary_data_size": z.nbytes}},
        {"name": "y", "shape": [images, num_classes], "datatype": "FP32",
         "parameters": {"binary_data_size": y.nbytes}}],
        "outputs": [{"name": "image", "parameters": {"binary_data": True}}]}).encode()
    return header, header + z.tobytes() + y.tobytes()
