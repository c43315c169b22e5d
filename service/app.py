"""create_app(): the HTTP API over the models of the manifest.

Routes are thin: resolve the model, turn the query into z (and y) with `sampling`, queue it on the
model's batcher (`batching`: one ONNX Runtime call for many requests, never on the event loop), and
await the response its encode thread builds with `imaging`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

import numpy as np
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import caching, imaging, sampling, v2
from service.auth import ApiKeys, load_keys
from service.batching import RETRY_AFTER_S, Batcher, Inputs, QueueFull
from service.config import Settings
from service.queries import openapi_query, query_models
from service.metrics import Metrics
from service.page import add_page
from service.registry import LoadedModel, Registry
from service.reload import Reloader

log = logging.getLogger("digitgen.app")

IMAGE_SIZE = 28
GIF_FRAME_MS = 120
VERSION = "0.1.0"


IMAGE_RESPONSES = {
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "format=png: one PNG grid (X-Seed header); format=json: "
                         '{"model", "seed", "width", "height", "images": [base64 PNG, ...]}. With a seed: a '
                         "strong ETag and Cache-Control: public, max-age=31536000, immutable; without: no-store"},
    304: {"description": "a seeded request whose If-None-Match holds its ETag: no body, the model not run"},
    404: {"description": "unknown model; the message lists the available ones"},
    422: {"description": "a parameter out of range or not applicable; the message names it"},
    503: {"description": "the model's queue is full (Retry-After says when to try again), or no model "
                         "can serve this endpoint"},
}


def query_error(param: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation shape, so clients parse one format."""
    return HTTPException(422, detail=[{"loc": ["query", param], "msg": message, "type": "value_error"}])


def create_app(settings: Settings | None = None, registry: Registry | None = None, warm: bool = True) -> FastAPI:
    """The app. Tests pass a registry (and warm=False to see the not-ready state)."""
    settings = settings or Settings()
    metrics = Metrics()
    encoder = ThreadPoolExecutor(max_workers=settings.encode_threads, thread_name_prefix="encode")
    batchers: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.registry = registry or Registry.load(settings)
        app.state.settings, app.state.batchers = settings, batchers
        loaded = app.state.registry.models
        log.info("serving %d model(s): %s", len(loaded), ", ".join(loaded) or "none")

        def batcher_for(model: LoadedModel) -> Batcher:
            return Batcher(model, settings.batch_max_size, settings.batch_max_wait_ms / 1000, settings.max_queued,
                           encoder, metrics)
        batchers.update({name: batcher_for(model) for name, model in loaded.items()})
        app.state.reloader = Reloader(app.state, settings, metrics, batcher_for)
        app.state.reloader.listen()
        warming = None
        if warm:
            warming = asyncio.get_running_loop().run_in_executor(encoder, _warm_all, app.state.registry,
                                                                 settings)
        yield
        if warming:
            await warming  # let a warm-up still running finish before the threads go
        for batcher in batchers.values():
            batcher.close()
        metrics.worker_exits()
        encoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="digit-gen", version=VERSION, lifespan=lifespan,
                  description="Handwritten digits from VAE and GAN models exported to ONNX.")
    app.include_router(v2.router("digit-gen", VERSION))
    add_page(app)
    app.add_exception_handler(v2.V2Error, v2.error_response)
    if settings.api_keys_file:  # inside CORS: preflights pass, and a browser can read the 401
        app.add_middleware(ApiKeys, keys=load_keys(settings.api_keys_file), counter=metrics.key_requests)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key", v2.HEADER_LENGTH],
                           expose_headers=["X-Seed", "X-Seed-To", "X-Model", "X-Truncation", "ETag",
                                           v2.HEADER_LENGTH])
    app.add_middleware(RequestMetrics, metrics=metrics)

    def resolve(request: Request, name: str | None, endpoint: str) -> LoadedModel:
        reg: Registry = request.app.state.registry
        name = name or reg.default(endpoint)
        if name is None:
            raise HTTPException(503, detail=f"no model loaded that can serve /{endpoint}")
        if name not in reg.models:
            raise HTTPException(404, detail=f"model: no model named {name!r}{reg.unavailable(name)}")
        return reg.models[name]

    def revalidate(request: Request, model: LoadedModel, endpoint: str, q) -> tuple[str | None, Response | None]:
        """A seeded request's ETag, and the 304 to answer at once when the client already holds it."""
        if q.seed is None:
            return None, None
        tag = caching.etag(model.entry.sha256, endpoint, q.model_dump() | {"model": model.name})
        if caching.matches(request.headers.get("if-none-match"), tag):
            return tag, Response(status_code=304, headers=caching.headers(tag))
        return tag, None

    async def respond(model: LoadedModel, size: int, inputs: Inputs, fmt: str, nrow: int, scale: int,
                      info: dict, tag: str | None) -> Response:
        """Queue the request on the model's batcher; its images come back encoded as `fmt`."""
        try:
            future = batchers[model.name].submit(size, inputs,
                                                 partial(render, fmt=fmt, nrow=nrow, scale=scale, info=info))
        except QueueFull as full:
            raise HTTPException(503, detail=f"{full}; retry shortly", headers={"Retry-After": RETRY_AFTER_S})
        response = await future
        response.headers.update(caching.headers(tag))
        return response

    SampleQuery, GenerateQuery, InterpolateQuery = query_models(settings)

    @app.get("/sample", responses=IMAGE_RESPONSES, summary="Random digits", openapi_extra=openapi_query(SampleQuery))
    async def sample(request: Request):
        """n images from a model. A conditional model draws a random class per image (listed in JSON as `digits`)."""
        q = SampleQuery.parse(request.query_params)
        loaded = resolve(request, q.model, "sample")
        tag, not_modified = revalidate(request, loaded, "sample", q)
        if not_modified:
            return not_modified
        seed = sampling.new_seed() if q.seed is None else q.seed
        entry = loaded.entry
        info = {"model": loaded.name, "seed": seed, "truncation": q.truncation}
        classes = None
        if entry.conditional:
            classes = sampling.random_classes(seed, q.n, entry.num_classes)
            info["digits"] = classes.tolist()

        def inputs():
            y = None if classes is None else sampling.one_hot(classes, entry.num_classes)
            return sampling.latents(seed, q.n, entry.latent_dim, q.truncation), y
        return await respond(loaded, q.n, inputs, q.format, q.nrow, q.scale, info, tag)

    @app.get("/generate", responses=IMAGE_RESPONSES, summary="Digits of one class",
             openapi_extra=openapi_query(GenerateQuery))
    async def generate(request: Request):
        """n images of one digit from a conditional model."""
        q = GenerateQuery.parse(request.query_params)
        loaded = resolve(request, q.model, "generate")
        entry = loaded.entry
        if not entry.conditional:
            raise query_error("model", f"model {loaded.name!r} is not conditional; /generate needs one of: "
                                       f"{', '.join(_conditional(request)) or 'none loaded'}")
        if q.digit >= entry.num_classes:
            raise query_error("digit", f"model {loaded.name!r} has classes 0-{entry.num_classes - 1}")
        tag, not_modified = revalidate(request, loaded, "generate", q)
        if not_modified:
            return not_modified
        seed = sampling.new_seed() if q.seed is None else q.seed
        info = {"model": loaded.name, "seed": seed, "digit": q.digit, "truncation": q.truncation}

        def inputs():
            return (sampling.latents(seed, q.n, entry.latent_dim, q.truncation),
                    sampling.one_hot([q.digit] * q.n, entry.num_classes))
        return await respond(loaded, q.n, inputs, q.format, q.nrow, q.scale, info, tag)

    @app.get("/interpolate", responses=IMAGE_RESPONSES | {200: {
        "content": {"image/png": {}, "image/gif": {}, "application/json": {}},
        "description": "the frames as one strip PNG, an animated GIF, or JSON with one base64 PNG per frame"}},
        summary="A walk between two latent points and/or two classes", openapi_extra=openapi_query(InterpolateQuery))
    async def interpolate(request: Request):
        """Frames from the z of `seed` to the z of `seed_to` and, for a conditional model, from class `digit`
        to class `digit_to` with the same z, or both at once."""
        q = InterpolateQuery.parse(request.query_params)
        loaded = resolve(request, q.model, "interpolate")
        entry = loaded.entry
        for name, value in (("digit", q.digit), ("digit_to", q.digit_to)):
            if value is not None and not entry.conditional:
                raise query_error(name, f"model {loaded.name!r} is not conditional: it takes no class")
            if value is not None and value >= entry.num_classes:
                raise query_error(name, f"model {loaded.name!r} has classes 0-{entry.num_classes - 1}")
        tag, not_modified = revalidate(request, loaded, "interpolate", q)
        if not_modified:
            return not_modified
        seed = sampling.new_seed() if q.seed is None else q.seed
        seed_to = q.seed_to
        if seed_to is None:
            seed_to = seed if q.digit_to is not None else (seed + 1) % (sampling.MAX_SEED + 1)
        info = {"model": loaded.name, "seed": seed, "seed_to": seed_to, "steps": q.steps, "method": q.method,
                "truncation": q.truncation}
        if entry.conditional:
            digit = int(sampling.random_classes(seed, 1, entry.num_classes)[0]) if q.digit is None else q.digit
            digit_to = digit if q.digit_to is None else q.digit_to
            info |= {"digit": digit, "digit_to": digit_to}

        def inputs():
            z = sampling.walk(sampling.latents(seed, 1, entry.latent_dim, q.truncation)[0],
                              sampling.latents(seed_to, 1, entry.latent_dim, q.truncation)[0], q.steps, q.method)
            if not entry.conditional:
                return z, None
            ends = sampling.one_hot([info["digit"], info["digit_to"]], entry.num_classes)
            return z, sampling.linear(ends[0], ends[1], np.linspace(0.0, 1.0, q.steps))
        return await respond(loaded, q.steps, inputs, q.format, q.steps, q.scale, info, tag)

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
                "left_out": reg.failures | request.app.state.reloader.left_out()}
        return JSONResponse(body, status_code=200 if reg.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def render(images: np.ndarray, fmt: str, nrow: int, scale: int, info: dict) -> Response:
    """One request's images as its response: a PNG grid, a GIF, or JSON with one base64 PNG per image.
    Runs on an encode thread, so the event loop only moves bytes."""
    headers = {"X-Model": info["model"], "X-Seed": str(info["seed"]), "X-Truncation": str(info["truncation"])}
    if "seed_to" in info:
        headers["X-Seed-To"] = str(info["seed_to"])
    if fmt == "json":
        side = IMAGE_SIZE * scale
        return JSONResponse({**info, "width": side, "height": side, "images": imaging.png_list(images, scale)},
                            headers=headers)
    if fmt == "gif":
        return Response(imaging.gif_bytes(images, scale, GIF_FRAME_MS), media_type="image/gif", headers=headers)
    return Response(imaging.png_grid(images, nrow, scale), media_type="image/png", headers=headers)


class RequestMetrics:
    """Counts requests and their latency by route and status: a plain ASGI middleware (BaseHTTPMiddleware
    costs a task and a stream per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


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
