"""The Open Inference Protocol (KServe V2) over the same models: what Triton, KServe, MLServer and Seldon
speak, so a client written for them (tritonclient, in JSON or binary mode) works against this service.

Infer requests share each model's batcher with the image endpoints: one ONNX Runtime call serves both,
under the same queue bound. Errors use the protocol's shape, {"error": "..."} (service/errors.py); the
wire format is service/openinference.py.
"""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import dispatch
from service import openinference as wire
from service.errors import ApiError
from service.modelset import ModelSet
from service.runtime.model import ModelRuntime


def model_version(models: ModelSet, name: str, version: str | None) -> ModelRuntime:
    """The model's version the path names, else the one it serves unpinned; 404 listing its versions."""
    return dispatch.model_for(models, name, "sample", None if version == wire.LEGACY_VERSION else version)


def metadata_of(models: ModelSet, model: ModelRuntime) -> dict:
    return wire.model_metadata(model.entry, [m.entry.version for m in models.versions_of(model.name)])


async def metadata(request: Request, name: str, version: str | None = None):
    models = dispatch.model_set(request)
    return metadata_of(models, model_version(models, name, version))


async def model_ready(request: Request, name: str, version: str | None = None):
    models = dispatch.model_set(request)
    model_version(models, name, version)
    if not models.warmed:
        raise ApiError(503, f"model {name!r} is warming up")
    return Response(status_code=200)


async def infer(request: Request, name: str, version: str | None = None):
    body = await request.body()  # first: from here to the batcher's submit nothing awaits (dispatch.py)
    models = dispatch.model_set(request)
    model = model_version(models, name, version)
    header, binary = wire.split_body(body, request.headers.get(wire.HEADER_LENGTH))
    z, y, binary_out, request_id = wire.parse_infer(header, binary, model.entry, dispatch.settings(request).max_n)
    finish = partial(wire.infer_response, model=model.name, version=model.entry.version, request_id=request_id,
                     binary=binary_out)
    return await dispatch.run(models, model, len(z), lambda: (z, y), finish, dispatch.settings(request).request_timeout_s,
                              raw=True, scope=request.scope)


def _latest(handler):
    """The handler for the path without /versions/{version}: the version the model serves unpinned."""
    async def latest(request: Request, name: str):
        return await handler(request, name, None)
    latest.__name__ = handler.__name__  # the same operationId as before
    return latest


def router(title: str, version: str) -> APIRouter:
    routes = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe V2)"])

    @routes.get("", summary="Server metadata", response_model=wire.ServerMetadata)
    async def server_metadata():
        return {"name": title, "version": version, "extensions": ["binary_tensor_data"]}

    @routes.get("/health/live", summary="Server liveness", response_class=Response,
                responses={200: {"description": "live (empty body)"}})
    async def live():
        return Response(status_code=200)

    @routes.get("/health/ready", summary="Server readiness: every loaded model warmed", response_class=Response,
                responses={200: {"description": "ready (empty body)"}, 503: wire.ERRORS[503]})
    async def ready(request: Request):
        if not dispatch.model_set(request).ready:
            raise ApiError(503, "warming up")
        return Response(status_code=200)

    infer_doc = wire.request_body_doc()
    for prefix, versioned in (("/models/{name}", False), ("/models/{name}/versions/{version}", True)):
        def route(handler, versioned=versioned):  # the unversioned path takes no `version` at all (not even as a query parameter)
            return handler if versioned else _latest(handler)
        routes.add_api_route(prefix, route(metadata), methods=["GET"], summary="Model metadata",
                             response_model=wire.ModelMetadata, responses={404: wire.ERRORS[404]})
        routes.add_api_route(f"{prefix}/ready", route(model_ready), methods=["GET"], summary="Model readiness",
                             response_class=Response, responses={200: {"description": "ready (empty body)"},
                                                                 404: wire.ERRORS[404], 503: wire.ERRORS[503]})
        routes.add_api_route(f"{prefix}/infer", route(infer), methods=["POST"], summary="Inference",
                             openapi_extra=infer_doc, responses={
                                 200: {"model": wire.InferResponse, "description": "the output as JSON, or "
                                       "(binary data) a JSON header of Inference-Header-Content-Length bytes "
                                       "then the raw float32 tensor", "content": {"application/octet-stream": {}}},
                                 **wire.ERRORS})
    return routes
