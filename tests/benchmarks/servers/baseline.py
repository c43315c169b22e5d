"""The plain way to serve the bundled cgan: a sync FastAPI endpoint, one `session.run` per request, Pillow PNG.

The load benchmark's reference point, not a product module: tests/benchmarks/serve_throughput.py runs it
with `python tests/benchmarks/servers/launch.py baseline --port P --workers N`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Query
from fastapi.responses import Response
from PIL import Image


def _bundled_cgan() -> str:
    """The file the bundled manifest serves as cgan (exported/cgan/<version>.onnx)."""
    manifest = json.loads(Path("exported/manifest.json").read_text())
    version = manifest.get("rollouts", {}).get("cgan", {}).get("default")
    return "exported/" + next(m["file"] for m in manifest["models"] if m["name"] == "cgan" and
                              (version is None or m["file"].endswith(f"{version}.onnx")))


MODEL = os.environ.get("BASELINE_MODEL") or _bundled_cgan()


def create_app() -> FastAPI:
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    latent_dim = session.get_inputs()[0].shape[1]
    app = FastAPI()

    def png(images: np.ndarray) -> bytes:
        pixels = (images[:, 0].clip(0, 1) * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        rows = [np.concatenate(list(pixels[i:i + 8]), axis=1) for i in range(0, len(pixels), 8)]
        if len(rows) > 1 and rows[-1].shape != rows[0].shape:  # pad a short last row
            rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1])))
        Image.fromarray(np.concatenate(rows, axis=0)).save(buffer, format="PNG")
        return buffer.getvalue()

    @app.get("/generate")
    def generate(digit: int = Query(..., ge=0, le=9), n: int = Query(1, ge=1, le=64), seed: int | None = None):
        z = np.random.default_rng(seed).standard_normal((n, latent_dim), dtype=np.float32)
        y = np.zeros((n, 10), np.float32)
        y[:, digit] = 1
        return Response(png(session.run(["image"], {"z": z, "y": y})[0]), media_type="image/png")

    @app.get("/sample")
    def sample(n: int = Query(1, ge=1, le=64), seed: int | None = None):
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, latent_dim), dtype=np.float32)
        y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
        return Response(png(session.run(["image"], {"z": z, "y": y})[0]), media_type="image/png")

    return app
