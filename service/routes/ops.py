"""What operators and dashboards ask: the loaded models, liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import dispatch
from service.live_quality import LiveQuality
from service.metrics import Metrics
from service.modelset import ModelSet
from service.runtime.model import ModelRuntime


def describe(models: ModelSet, model: ModelRuntime) -> dict:
    """What a client and an operator want of a model; `runtime`: where this worker runs its batches now,
    and why."""
    e, placement = model.entry, model.placement
    return {"name": e.name, "family": e.family, "conditional": e.conditional, "latent_dim": e.latent_dim,
            "num_classes": e.num_classes, "class_names": e.class_names, "provider": placement.provider,
            "cpu_up_to_batch": placement.cpu_up_to, "gpu_process": placement.process_pid is not None,
            "runtime": placement.describe(), "version": e.version,
            "dataset": e.dataset, "metrics": e.metrics, "training": e.training.model_dump(),
            "default": bool(models.defaults_of(e.name)), "default_for": models.defaults_of(e.name)}


def relative(reason: str, models_dir) -> str:
    """A reason with the models folder's path taken out: /readyz is open even with keys on, and where the
    files live on the server is nobody's business."""
    for folder in {str(Path(models_dir).resolve()), str(models_dir)}:
        reason = reason.replace(folder.rstrip("/") + "/", "")
    return reason


def versions(models: ModelSet, model: ModelRuntime) -> list[dict]:
    """Every version of the model this worker serves: which one unpinned requests get, each one's figures."""
    canary = models.canaries.get(model.name)
    return [{"version": m.entry.version, "sha256": m.entry.sha256, "served_unpinned": m is model,
             "canary_share": canary[1] if canary is not None and canary[0] is m else None,
             "training": m.entry.training.model_dump(), "metrics": m.entry.metrics,
             "quality": m.entry.quality.model_dump() if m.entry.quality else None}
            for m in models.versions_of(model.name)]


def quality(models: ModelSet, model: ModelRuntime, live: LiveQuality) -> dict:
    """The figures its judge recorded at export, what the quality gate measured before this worker served
    it, and the judge's live figure over what this worker served lately (None where there is none)."""
    gated = models.gated.get(model.key)
    return {"recorded": model.entry.quality.model_dump() if model.entry.quality else None,
            "gate": gated.describe() if gated else None, "live": live.snapshot(model)}


def router(metrics: Metrics) -> APIRouter:
    routes = APIRouter(tags=["Operations"])

    @routes.get("/models", summary="The loaded models")
    async def models(request: Request):
        current = dispatch.model_set(request)
        return {"models": [describe(current, m) for m in current.models.values()], "generation": current.generation,
                "gpu_memory_bytes": request.app.state.gpu_memory_bytes}  # on CUDA: this worker's + its GPU process's

    @routes.get("/models/{name}", summary="One model",
                responses={404: {"description": "unknown model; the message lists the available ones"}})
    async def model_info(request: Request, name: str = PathParam(description="a model name from GET /models")):
        current = dispatch.model_set(request)
        model = dispatch.model_for(current, name, "sample")
        return describe(current, model) | {"quality": quality(current, model, request.app.state.live),
                                           "versions": versions(current, model)}

    @routes.get("/healthz", summary="Liveness: the process is up and every model's batch threads run")
    async def healthz(request: Request):
        stopped = [name for name, queue in dispatch.model_set(request).queues.items() if not queue.alive]
        if stopped:
            return JSONResponse({"status": "failing", "stopped_batch_threads": stopped}, status_code=503)
        return {"status": "ok"}

    @routes.get("/readyz", summary="Readiness: 200 once every loaded model is warmed, 503 before")
    async def readyz(request: Request):
        current = dispatch.model_set(request)
        left_out = dict(current.failures) | request.app.state.reloader.left_out()
        body = {"ready": current.ready, "generation": current.generation,
                "models": {n: current.warmed for n in current.models},
                "left_out": {name: relative(why, dispatch.settings(request).models_dir) for name, why in left_out.items()}}
        return JSONResponse(body, status_code=200 if current.ready else 503)

    @routes.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return routes
