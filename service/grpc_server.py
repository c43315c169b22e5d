"""The Open Inference Protocol (KServe V2) over gRPC: `inference.GRPCInferenceService` on
DIGITGEN_GRPC_PORT, in every worker beside its HTTP server (each worker binds the port with SO_REUSEPORT,
as it does the HTTP one), on the same event loop and the same model set.

Everything is shared with HTTP: the batchers (one ONNX Runtime call serves both transports) and their
queue bound, the request timeout, the API keys (metadata `authorization: Bearer KEY` or `x-api-key`),
the metrics (`digitgen_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",status="OK"}`, the
real status code: INTERNAL for an unexpected failure, CANCELLED for a call the client gave up)
and the validation with its messages (openinference.parse_infer): an HTTP 400 is INVALID_ARGUMENT with the
same text. Output goes back as raw_output_contents, as Triton answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc import aio

from service import dispatch
from service import openinference as wire
from service.auth import key_name
from service.errors import ApiError
from service.metrics import Metrics
from service.protocol import SERVICE, messages, methods

log = logging.getLogger("digitgen.grpc")

# HTTP status of an ApiError -> the gRPC code with the same meaning
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
OPEN = {"ServerLive", "ServerReady"}  # like /v2/health/*: no key needed, not counted in flight


class Servicer:
    """One handler per RPC; each reads the app's current model set once, as the HTTP routes do."""

    def __init__(self, state, metrics: Metrics, keys: dict[str, str] | None, title: str, version: str):
        self.state, self.metrics, self.keys, self.title, self.version = state, metrics, keys, title, version

    async def ServerLive(self, request, context):
        return messages.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return messages.ServerReadyResponse(ready=self.state.models.ready)

    async def ModelReady(self, request, context):
        models = self.state.models
        _model(models, request.name, request.version)
        return messages.ModelReadyResponse(ready=models.ready)

    async def ServerMetadata(self, request, context):
        return messages.ServerMetadataResponse(name=self.title, version=self.version, extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request, context):
        models = self.state.models
        model = _model(models, request.name, request.version)
        metadata = wire.model_metadata(model.entry, [m.entry.version for m in models.versions_of(model.name)])
        return messages.ModelMetadataResponse(**metadata)

    async def ModelInfer(self, request, context):
        models, settings = self.state.models, self.state.settings
        model = _model(models, request.model_name, request.model_version)
        header, binary = wire.grpc_header(request)
        z, y, _, request_id = wire.parse_infer(header, binary, model.entry, settings.max_n)

        def finish(output):
            return wire.grpc_infer_response(output, model.name, model.entry.version, request_id, messages)
        left = context.time_remaining()  # the client's deadline, when it set one: the job expires with it
        timeout = settings.request_timeout_s if left is None else max(0.0, min(settings.request_timeout_s, left))
        return await dispatch.run(models, model, len(z), lambda: (z, y), finish, timeout, raw=True)


def _model(models, name: str, version: str):
    if not name:
        raise ApiError(400, "a model name is required")
    return dispatch.model_for(models, name, "sample", None if version in ("", wire.LEGACY_VERSION) else version)


def _handler(servicer: Servicer, name: str) -> grpc.RpcMethodHandler:
    """An RPC with the service's keys, errors and metrics around it."""
    request_type, _ = methods[name]
    call = getattr(servicer, name)
    endpoint = f"/{SERVICE}/{name}"
    requests, latency = servicer.metrics.requests, servicer.metrics.latency.labels(endpoint)
    in_flight = None if name in OPEN else servicer.metrics.in_flight  # as over HTTP: the health probes are not load

    async def handle(request, context: aio.ServicerContext):
        started, code = time.perf_counter(), grpc.StatusCode.OK
        if in_flight is not None:
            in_flight.inc()
        try:
            if servicer.keys is not None and name not in OPEN:
                _authorize(dict(context.invocation_metadata()), servicer)
            return await call(request, context)
        except ApiError as err:
            code = _code(err)
            await context.abort(code, err.message)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: its job is dropped
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as err:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", endpoint)
            await context.abort(code, f"internal error: {type(err).__name__}")
        finally:
            if in_flight is not None:
                in_flight.dec()
            requests.labels(endpoint, code.name).inc()
            latency.observe(time.perf_counter() - started)
    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_type.FromString,
                                               response_serializer=_serialize)


def _serialize(message) -> bytes:
    return message.SerializeToString()


def _code(err: ApiError) -> grpc.StatusCode:
    if err.status == 503 and err.headers and "Retry-After" in err.headers:
        return grpc.StatusCode.RESOURCE_EXHAUSTED  # the model's queue is full: retry shortly
    return CODES.get(err.status, grpc.StatusCode.UNKNOWN)


def _authorize(metadata: dict[str, Any], servicer: Servicer) -> None:
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else str(metadata.get("x-api-key", "")).strip()
    name = key_name(presented, servicer.keys) if presented and servicer.keys is not None else None
    if name is None:
        why = "a valid API key is required" if not presented else "the API key is not valid"
        raise ApiError(401, f"{why}: send metadata `authorization: Bearer KEY` or `x-api-key: KEY`")
    servicer.metrics.key_requests.labels(name).inc()
    buckets = getattr(servicer.state, "buckets", None)
    wait = buckets.take(name) if buckets is not None else 0.0
    if wait and buckets is not None:
        servicer.metrics.key_throttled.labels(name).inc()
        raise ApiError(429, f"key {name} is over its limit of {buckets.limits[name].rate:g} requests/s; retry after "
                            f"{wait:.2f} s")


async def start(state, metrics: Metrics, keys: dict[str, str] | None, host: str, port: int,
                title: str, version: str, max_message_bytes: int) -> aio.Server:
    """The gRPC server of this worker, listening on host:port (shared with the other workers)."""
    server = aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", max_message_bytes)])
    servicer = Servicer(state, metrics, keys, title, version)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {name: _handler(servicer, name) for name in methods}),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for gRPC")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server

