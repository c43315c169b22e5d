"""create_app(): builds the state, mounts the routers and the middleware; the handlers live in routes/.

State: `app.state.models`, the ModelSet being served (service/modelset.py), swapped whole by
`app.state.reloader` (service/reload.py), its only writer; `app.state.settings`, read once.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import devices, openinference
from service.auth import ApiKeys, load_keys
from service.batching import Batcher
from service.config import Settings
from service.errors import ApiError, error_response
from service.metrics import Metrics
from service.middleware import BodyLimit, HotRoutes, RequestMetrics
from service.modelset import open_set
from service.providers import plan
from service.quality import LiveQuality
from service.registry import LoadedModel
from service.reload import Reloader
from service.routes import images, ops, page, v2

log = logging.getLogger("digitgen.app")

VERSION = "0.1.0"
HOT_PATHS = {"/sample", "/generate", "/interpolate", "/v2/models/{name}/infer",
             "/v2/models/{name}/versions/{version}/infer"}
EXPOSED_HEADERS = ["X-Seed", "X-Seed-To", "X-Model", "X-Truncation", "ETag", openinference.HEADER_LENGTH]


def create_app(settings: Settings | None = None, warm: bool = True,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app. Alone, it answers at once and warms its models in the background (/readyz 503 until then).
    A supervised worker (service/workers.py) passes `on_ready`: its models warm before it takes a request,
    so a worker that listens is a ready one (the kernel sends a replacement nothing while it is cold), and
    `on_ready` tells the supervisor. Tests pass warm=False to see the not-ready state."""
    settings = plan(settings or Settings())
    metrics = Metrics()
    keys = load_keys(settings.api_keys_file) if settings.api_keys_file else None
    app = FastAPI(title="digit-gen", version=VERSION, lifespan=lifespan_of(settings, metrics, keys, warm, on_ready),
                  description="Handwritten digits from VAE and GAN models exported to ONNX.")
    for router in (images.router(settings), v2.router("digit-gen", VERSION), ops.router(metrics)):
        mount(app, router)
    page.add_page(app)
    app.add_exception_handler(ApiError, error_response)
    app.add_middleware(HotRoutes, routes=[r for r in app.routes if getattr(r, "path", None) in HOT_PATHS])
    app.add_middleware(BodyLimit)
    if keys:  # inside CORS: preflights pass, and a browser can read the 401
        app.add_middleware(ApiKeys, keys=keys, counter=metrics.key_requests)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key", openinference.HEADER_LENGTH],
                           expose_headers=EXPOSED_HEADERS)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def mount(app: FastAPI, router: APIRouter) -> None:
    """The router's routes as the app's own. `include_router` keeps a router nested since FastAPI 0.165,
    and matching through the nesting costs every request about 15 us (a fifth of a 304's CPU: make
    bench-serve); a router's prefix, tags and responses are already in its routes, so nothing is lost."""
    app.router.routes.extend(router.routes)


async def start_grpc(app: FastAPI, settings: Settings, metrics: Metrics, keys: dict[str, str] | None):
    """The V2 gRPC server of this worker (imported only when asked for: grpcio is not needed otherwise)."""
    from service import grpc_server
    return await grpc_server.start(app.state, metrics, keys, settings.host, settings.grpc_port, "digit-gen", VERSION,
                                   app.state.models.max_body_bytes)


def lifespan_of(settings: Settings, metrics: Metrics, keys: dict[str, str] | None, warm: bool,
                on_ready: Callable[[], None] | None):
    """Start-up: open the models (cold), warm them off the event loop (in the background, or first for a
    supervised worker) and swap in the warmed set. Shutdown: let warm-up finish, drain every batcher, stop
    the encode threads."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        encoder = ThreadPoolExecutor(max_workers=settings.encode_threads, thread_name_prefix="encode")
        live = app.state.live = LiveQuality(metrics, lambda: app.state.models)  # the judge on what is served

        def make_batcher(model: LoadedModel) -> Batcher:
            in_flight = settings.gpu_batches_in_flight if model.gpu_process_pid else 1
            return Batcher(model, settings.batch_max_size, settings.batch_max_wait_ms / 1000, settings.max_queued,
                           encoder, metrics, live.offer, threads=in_flight)
        app.state.settings = settings
        app.state.models = open_set(settings, make_batcher)
        log.info("serving %d model(s): %s", len(app.state.models.models), ", ".join(app.state.models.models) or "none")
        app.state.reloader = reloader = Reloader(app.state, settings, metrics, make_batcher)
        warming = None
        if on_ready is not None:
            await reloader.warm_up(on_ready)
        elif warm:
            warming = asyncio.create_task(reloader.warm_up())
        reloader.listen()
        grpc = await start_grpc(app, settings, metrics, keys) if settings.grpc_port else None
        app.state.gpu_memory_bytes = None
        watching = asyncio.create_task(devices.watch(app.state, metrics))
        yield
        watching.cancel()
        if grpc is not None:
            await grpc.stop(grace=5)
        if warming:
            await warming
        await reloader.stop()
        for batcher in app.state.models.batchers.values():
            batcher.close()
        live.close()
        metrics.worker_exits()
        encoder.shutdown(wait=False, cancel_futures=True)
    return lifespan
