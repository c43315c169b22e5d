"""The HTTP limit: the same server stack returning one constant, pre-encoded PNG from an async endpoint
(a 28x28 digit for /generate, an 8x8 grid of them for /sample: the sizes the service answers with).

Run by tests/benchmarks/serve_throughput.py: uvicorn --factory tests.benchmarks.servers.ceiling:create_app
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
    digit = (ring * 255).astype(np.uint8)
    one, grid = png(digit), png(np.tile(digit, (8, 8)))
    app = FastAPI()

    @app.get("/generate")
    async def generate():
        return Response(one, media_type="image/png")

    @app.get("/sample")
    async def sample():
        return Response(grid, media_type="image/png")

    return app
