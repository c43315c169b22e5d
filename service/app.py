"""create_app(): the HTTP API over the models of the manifest.

Routes are thin: resolve the model, turn the query into z (and y) with `sampling`, run the model in a
thread pool (never on the event loop), encode with `imaging`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from enum import Enum

import numpy as np
from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import imaging, sampling
from service.config import Settings
from service.metrics import Metrics
from service.registry import LoadedModel, Registry

log = logging.getLogger("digitgen.app")

IMAGE_SIZE = 28
DEFAULT_NROW = 8
GIF_FRAME_MS = 120


class ImageFormat(str, Enum):
    png = "png"
    json = "json"


class WalkFormat(str, Enum):
    png = "png"
    json = "json"
    gif = "gif"


class Method(str, Enum):
    slerp = "slerp"
    linear = "linear"


IMAGE_RESPONSES = {
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "format=png: one PNG grid (X-Seed header); format=json: "
                         '{"model", "seed", "width", "height", "images": [base64 PNG, ...]}'},
    404: {"description": "unknown model; the message lists the available ones"},
    422: {"description": "a parameter out of range or not applicable; the message names it"},
}


def query_error(param: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation shape, so clients parse one format."""
    return HTTPException(422, detail=[{"loc": ["query", param], "msg": message, "type": "value_error"}])


def create_app(settings: Settings | None = None, registry: Registry | None = None, warm: bool = True) -> FastAPI:
    """The app. Tests pass a registry (and warm=False to see the not-ready state)."""
    settings = settings or Settings()
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=settings.inference_threads, thread_name_prefix="inference")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.registry = registry or Registry.load(settings)
        loaded = app.state.registry.models
        log.info("serving %d model(s): %s", len(loaded), ", ".join(loaded) or "none")
        warming = None
        if warm:
            warming = asyncio.get_running_loop().run_in_executor(executor, _warm_all, app.state.registry,
                                                                 settings)
        yield
        if warming:
            await warming  # let a warm-up still running finish before the pool goes
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="digit-gen", version="0.1.0", lifespan=lifespan,
                  description="Handwritten digits from VAE and GAN models exported to ONNX.")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET"],
                           expose_headers=["X-Seed", "X-Seed-To", "X-Model"])

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def resolve(request: Request, name: str | None, endpoint: str) -> LoadedModel:
        reg: Registry = request.app.state.registry
        name = name or reg.default(endpoint)
        if name is None:
            raise HTTPException(503, detail=f"no model loaded that can serve /{endpoint}")
        if name not in reg.models:
            why = f" (left out at startup: {reg.failures[name]})" if name in reg.failures else ""
            raise HTTPException(404, detail=f"model: no model named {name!r}{why}; "
                                            f"available: {', '.join(reg.models) or 'none'}")
        return reg.models[name]

    async def infer(model: LoadedModel, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        started = time.perf_counter()
        images = await asyncio.get_running_loop().run_in_executor(executor, model.run, z, y)
        metrics.inference.labels(model.name).observe(time.perf_counter() - started)
        metrics.batch.labels(model.name).observe(len(z))
        return images

    async def render(images: np.ndarray, fmt: str, nrow: int, scale: int, info: dict) -> Response:
        headers = {"X-Model": info["model"], "X-Seed": str(info["seed"])}
        if "seed_to" in info:
            headers["X-Seed-To"] = str(info["seed_to"])
        loop = asyncio.get_running_loop()
        if fmt == "json":
            encoded = await loop.run_in_executor(executor, imaging.png_list, images, scale)
            side = IMAGE_SIZE * scale
            return JSONResponse({**info, "width": side, "height": side, "images": encoded}, headers=headers)
        if fmt == "gif":
            body = await loop.run_in_executor(executor, imaging.gif_bytes, images, scale, GIF_FRAME_MS)
            return Response(body, media_type="image/gif", headers=headers)
        body = await loop.run_in_executor(executor, imaging.png_grid, images, nrow, scale)
        return Response(body, media_type="image/png", headers=headers)

    model_q = Query(None, description="model name (GET /models); omitted: the manifest's default for this endpoint")
    seed_q = Query(None, ge=0, le=sampling.MAX_SEED,
                   description="random seed; the same parameters and seed give byte-identical output. "
                               "Omitted: drawn and returned (X-Seed header, `seed` in JSON)")
    n_q = Query(1, ge=1, le=settings.max_n, description=f"number of images, 1-{settings.max_n}")
    nrow_q = Query(DEFAULT_NROW, ge=1, le=settings.max_n, description="images per row of the PNG grid")
    scale_q = Query(1, ge=1, le=settings.max_scale,
                    description=f"integer upscaling of each 28x28 image, nearest neighbour, 1-{settings.max_scale}")
    format_q = Query(ImageFormat.png, description="png: one grid image; json: one base64 PNG per image")

    @app.get("/sample", responses=IMAGE_RESPONSES, summary="Random digits")
    async def sample(request: Request, model: str | None = model_q, n: int = n_q, seed: int | None = seed_q,
                     format: ImageFormat = format_q, nrow: int = nrow_q, scale: int = scale_q):
        """n images from a model. A conditional model draws a random class per image (listed in JSON as `digits`)."""
        loaded = resolve(request, model, "sample")
        seed = sampling.new_seed() if seed is None else seed
        entry = loaded.entry
        z = sampling.latents(seed, n, entry.latent_dim)
        info = {"model": loaded.name, "seed": seed}
        y = None
        if entry.conditional:
            classes = sampling.random_classes(seed, n, entry.num_classes)
            y = sampling.one_hot(classes, entry.num_classes)
            info["digits"] = classes.tolist()
        return await render(await infer(loaded, z, y), format.value, nrow, scale, info)

    @app.get("/generate", responses=IMAGE_RESPONSES, summary="Digits of one class")
    async def generate(request: Request,
                       digit: int = Query(..., ge=0, le=9, description="the class to draw, 0-9"),
                       model: str | None = model_q, n: int = n_q, seed: int | None = seed_q,
                       format: ImageFormat = format_q, nrow: int = nrow_q, scale: int = scale_q):
        """n images of one digit from a conditional model."""
        loaded = resolve(request, model, "generate")
        entry = loaded.entry
        if not entry.conditional:
            raise query_error("model", f"model {loaded.name!r} is not conditional; /generate needs one of: "
                                       f"{', '.join(_conditional(request)) or 'none loaded'}")
        if digit >= entry.num_classes:
            raise query_error("digit", f"model {loaded.name!r} has classes 0-{entry.num_classes - 1}")
        seed = sampling.new_seed() if seed is None else seed
        z = sampling.latents(seed, n, entry.latent_dim)
        y = sampling.one_hot([digit] * n, entry.num_classes)
        info = {"model": loaded.name, "seed": seed, "digit": digit}
        return await render(await infer(loaded, z, y), format.value, nrow, scale, info)

    @app.get("/interpolate", responses=IMAGE_RESPONSES | {200: {
        "content": {"image/png": {}, "image/gif": {}, "application/json": {}},
        "description": "the frames as one strip PNG, an animated GIF, or JSON with one base64 PNG per frame"}},
        summary="A walk between two latent points and/or two classes")
    async def interpolate(
            request: Request, model: str | None = model_q,
            steps: int = Query(8, ge=2, le=settings.max_steps,
                               description=f"frames, both ends included, 2-{settings.max_steps}"),
            seed: int | None = seed_q,
            seed_to: int | None = Query(None, ge=0, le=sampling.MAX_SEED,
                                        description="seed of the end point's z. Omitted: the same z as `seed` "
                                                    "when digit_to is given (a pure class blend), else seed + 1"),
            digit: int | None = Query(None, ge=0, le=9, description="conditional models: the start class "
                                                                     "(omitted: drawn from the seed)"),
            digit_to: int | None = Query(None, ge=0, le=9, description="conditional models: the end class; the "
                                                                        "class vector is blended linearly "
                                                                        "(omitted: the start class)"),
            method: Method = Query(Method.slerp, description="slerp (default) or linear path between the z"),
            format: WalkFormat = Query(WalkFormat.png, description="png: one strip; gif: animated; json: "
                                                                   "one base64 PNG per frame"),
            scale: int = scale_q):
        """Frames from the z of `seed` to the z of `seed_to` and, for a conditional model, from class `digit`
        to class `digit_to` with the same z, or both at once."""
        loaded = resolve(request, model, "interpolate")
        entry = loaded.entry
        for name, value in (("digit", digit), ("digit_to", digit_to)):
            if value is not None and not entry.conditional:
                raise query_error(name, f"model {loaded.name!r} is not conditional: it takes no class")
            if value is not None and value >= entry.num_classes:
                raise query_error(name, f"model {loaded.name!r} has classes 0-{entry.num_classes - 1}")
        seed = sampling.new_seed() if seed is None else seed
        if seed_to is None:
            seed_to = seed if digit_to is not None else (seed + 1) % (sampling.MAX_SEED + 1)
        z = sampling.walk(sampling.latents(seed, 1, entry.latent_dim)[0],
                          sampling.latents(seed_to, 1, entry.latent_dim)[0], steps, method.value)
        info = {"model": loaded.name, "seed": seed, "seed_to": seed_to, "steps": steps, "method": method.value}
        y = None
        if entry.conditional:
            digit = int(sampling.random_classes(seed, 1, entry.num_classes)[0]) if digit is None else digit
            digit_to = digit if digit_to is None else digit_to
            ends = sampling.one_hot([digit, digit_to], entry.num_classes)
            y = sampling.linear(ends[0], ends[1], np.linspace(0.0, 1.0, steps))
            info |= {"digit": digit, "digit_to": digit_to}
        return await render(await infer(loaded, z, y), format.value, steps, scale, info)

    def describe(reg: Registry, model: LoadedModel) -> dict:
        e = model.entry
        return {"name": e.name, "family": e.family, "conditional": e.conditional, "latent_dim": e.latent_dim,
                "num_classes": e.num_classes, "class_names": e.class_names, "provider": model.provider,
                "dataset": e.dataset, "metrics": e.metrics, "training": e.training.model_dump(),
                "default": bool(reg.defaults_of(e.name)), "default_for": reg.defaults_of(e.name)}

    def _conditional(request: Request) -> list[str]:
        return [n for n, m in request.app.state.registry.models.items() if m.entry.conditional]

    @app.get("/models", summary="The loaded models")
    async def models(request: Request):
        reg: Registry = request.app.state.registry
        return {"models": [describe(reg, m) for m in reg.models.values()]}

    @app.get("/models/{name}", summary="One model", responses={404: IMAGE_RESPONSES[404]})
    async def model_info(request: Request, name: str = Path(description="a model name from GET /models")):
        return describe(request.app.state.registry, resolve(request, name, "sample"))

    @app.get("/healthz", summary="Liveness: the process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once every loaded model is warmed, 503 before")
    async def readyz(request: Request):
        reg: Registry = request.app.state.registry
        body = {"ready": reg.ready, "models": {n: m.warmed for n, m in reg.models.items()},
                "left_out": reg.failures}
        return JSONResponse(body, status_code=200 if reg.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _warm_all(registry: Registry, settings: Settings) -> None:
    """Warm every model at the smallest and largest batch; a model that fails here is left out."""
    for name, model in list(registry.models.items()):
        started = time.perf_counter()
        try:
            model.warm((1, settings.max_n))
        except Exception as err:  # a file that loads but cannot run must not take the others down
            registry.failures[name] = f"warm-up failed: {err}"
            del registry.models[name]
            log.error("model %s left out: warm-up failed: %s", name, err)
            continue
        log.info("model %s warmed in %.0f ms", name, 1000 * (time.perf_counter() - started))
