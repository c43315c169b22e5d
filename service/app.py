"""create_app(): builds the state, mounts the routers and the middleware; the handlers live in routes/.

State: `app.state.models`, the ModelSet being served (service/modelset.py), swapped whole by
`app.state.reloader` (service/reload.py), its only writer; `app.state.settings`, read once;
`app.state.plan`, what this machine gets (service/plan.py), computed once.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import openinference, process_metrics
from service.auth import ApiKeys, load_keys
from service.config import Settings
from service.errors import ApiError, client_gone, error_response, http_error_response
from service.live_quality import LiveQuality
from service.manifest import Manifest
from service.metrics import Metrics
from service.middleware import BodyLimit, HotRoutes, RequestMetrics
from service.modelset import Loader, ModelSet, open_set
from service.plan import Plan, make_plan
from service.ratelimit import Buckets, load_limits
from service.reload import Follower, Reloader
from service.routes import docs, images, ops, page, v2
from service.runtime import devices
from service.runtime.attach import Attacher
from service.runtime.model import ModelRuntime
from service.runtime.model_queue import ModelQueue

if TYPE_CHECKING:
    from service.workers import Supervised

log = logging.getLogger("digitgen.app")

VERSION = "0.1.0"
HOT_PATHS = {"/sample", "/generate", "/interpolate", "/v2/models/{name}/infer",
             "/v2/models/{name}/versions/{version}/infer"}
EXPOSED_HEADERS = ["X-Seed", "X-Seed-To", "X-Model", "X-Model-Version", "X-Truncation", "X-Ignored-Parameters",
                   "X-Request-ID", "ETag",
                   openinference.HEADER_LENGTH]


def create_app(settings: Settings | None = None, plan: Plan | None = None, warm: bool = True,
               supervised: Supervised | None = None, buckets: Buckets | None = None) -> FastAPI:
    """The app. Alone, it answers at once and warms its models in the background (/readyz 503 until then).
    A supervised worker (service/workers.py) serves what its supervisor decided: its models warm before it
    takes a request, so a worker that listens is a ready one (the kernel sends a replacement nothing while
    it is cold). Tests pass warm=False to see the not-ready state."""
    settings = settings or Settings()
    plan = plan or make_plan(settings)
    metrics = Metrics()
    keys = load_keys(settings.api_keys_file) if settings.api_keys_file else None
    if keys and buckets is None:  # one process: its own buckets (several workers get the supervisor's)
        buckets = Buckets(load_limits(settings.api_keys_file)) if settings.api_keys_file else None
    app = FastAPI(title="digit-gen", version=VERSION, lifespan=lifespan_of(settings, plan, metrics, keys, warm, supervised),
                  docs_url=None, redoc_url=None,  # service/routes/docs.py: the package's own, never a CDN's
                  description="Handwritten digits from VAE and GAN models exported to ONNX.")
    app.state.buckets = buckets  # the keys' rate limits, for HTTP (the middleware) and gRPC
    for router in (images.router(settings), v2.router("digit-gen", VERSION), ops.router(metrics)):
        mount(app, router)
    page.add_page(app)
    docs.add_docs(app, keys_on=bool(keys))
    app.add_exception_handler(ApiError, error_response)  # type: ignore[arg-type]  # Starlette types it for Exception
    app.add_exception_handler(StarletteHTTPException, http_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_middleware(HotRoutes, routes=[r for r in app.routes if getattr(r, "path", None) in HOT_PATHS])
    app.add_middleware(BodyLimit)
    if keys:  # inside CORS: preflights pass, and a browser can read the 401
        app.add_middleware(ApiKeys, keys=keys, counter=metrics.key_requests, buckets=buckets,
                           throttled=metrics.key_throttled)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key", openinference.HEADER_LENGTH],
                           expose_headers=EXPOSED_HEADERS)
    app.add_middleware(RequestMetrics, metrics=metrics, access_log=settings.access_log)
    return app


def mount(app: FastAPI, router: APIRouter) -> None:
    """The router's routes as the app's own. `include_router` keeps a router nested since FastAPI 0.165,
    and matching through the nesting costs every request about 15 us (a fifth of a 304's CPU: make
    bench-serve); a router's prefix, tags and responses are already in its routes, so nothing is lost."""
    app.router.routes.extend(router.routes)


async def start_grpc(app: FastAPI, settings: Settings, metrics: Metrics, keys: dict[str, str] | None):
    """The V2 gRPC server of this worker (imported only when asked for: grpcio is not needed otherwise)."""
    from service import grpc_server
    assert settings.grpc_port is not None
    return await grpc_server.start(app.state, metrics, keys, settings.host, settings.grpc_port, "digit-gen", VERSION,
                                   app.state.models.max_body_bytes)


def lifespan_of(settings: Settings, plan: Plan, metrics: Metrics, keys: dict[str, str] | None, warm: bool,
                supervised: Supervised | None):
    """Start-up, alone: open the models (cold, on this process's own sessions), gate and warm them off the
    event loop in the background, swap in the warmed set. Supervised: prepare the supervisor's decision
    and serve it once told to. Then attach the models to the inference process when there is one.
    Shutdown: let warm-up finish, drain every queue, stop the threads."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        encoder = ThreadPoolExecutor(max_workers=settings.encode_threads, thread_name_prefix="encode")
        live = app.state.live = LiveQuality(metrics, lambda: app.state.models)  # the judge on what is served

        def make_queue(model: ModelRuntime) -> ModelQueue:
            return ModelQueue(model, max_batch=settings.batch_max_size, max_wait_s=settings.batch_max_wait_ms / 1000,
                              max_queued=settings.max_queued, encoder=encoder, metrics=metrics, watch=live.offer,
                              threads=settings.gpu_batches_in_flight if plan.inference_socket else 1)
        loader = Loader(settings, plan, make_queue, metrics.placement_changed)
        app.state.settings, app.state.plan = settings, plan
        warming = None
        reloader: Reloader | Follower
        if supervised is not None:
            app.state.models = ModelSet(Manifest(), {}, {})  # nothing until the first set is committed
            app.state.reloader = reloader = Follower(app.state, loader, supervised.channel)
            reloader.start(supervised.decision, supervised.failure)
            await reloader.first()
        else:
            app.state.models = open_set(loader)
            log.info("serving %d model(s): %s", len(app.state.models.models), ", ".join(app.state.models.models) or "none")
            app.state.reloader = reloader = Reloader(app.state, loader, metrics)
            if warm:
                warming = asyncio.create_task(reloader.warm_up())
        attacher = Attacher(plan.inference_socket, lambda: app.state.models.versions.values(),
                            max(settings.max_n, settings.batch_max_size)) if plan.inference_socket else None
        if attacher is not None:
            attacher.start()
        reloader.listen()
        grpc = await start_grpc(app, settings, metrics, keys) if settings.grpc_port else None
        app.state.gpu_memory_bytes = None
        watching = asyncio.create_task(devices.watch(app.state, metrics))
        process_watch = asyncio.create_task(process_metrics.watch(metrics))
        yield
        watching.cancel()
        process_watch.cancel()
        if grpc is not None:
            await grpc.stop(grace=5)
        if warming:
            await warming
        await reloader.stop()
        if attacher is not None:
            attacher.stop()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, queue.close) for queue in app.state.models.queues.values()))
        live.close()
        metrics.worker_exits()
        encoder.shutdown(wait=False, cancel_futures=True)
    return lifespan
