"""The HTTP limit: the same server stack returning one constant, pre-encoded 28x28 PNG from an async endpoint.

Run by tests/benchmarks/serve_throughput.py through launch.py, like the baseline.
"""

from __future__ import annotations

import io

import numpy as np
from fastapi import FastAPI
from fastapi.responses import Response
from PIL import Image


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def create_app() -> FastAPI:
    rows, cols = np.mgrid[:28, :28]
    ring = np.abs(np.hypot(rows - 13.5, (cols - 13.5) * 1.4) - 9) < 2  # a drawn "0", about a digit's PNG size
    body = png((ring * 255).astype(np.uint8))
    app = FastAPI()

    @app.get("/generate")
    async def generate():
        return Response(body, media_type="image/png")

    return app
