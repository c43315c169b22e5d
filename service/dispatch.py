"""How HTTP and gRPC reach a model: one lookup (the model set of this request, a model by name) and one
`run` (the job on the model's queue, with the service's errors: 404, 503 on a full queue, 504 past the
timeout, 500 when the model or the encoding fails).

Plain functions rather than FastAPI `Depends`: dependency solving cost more than the rest of a request
(service/queries.py). A route reads the set once and, with no await between, takes its model and submits
to that model's queue, so a reload swapping the set in between cannot split them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Callable, MutableMapping

from fastapi import Request

from service import logs
from service.config import Settings
from service.errors import ApiError
from service.http_protocol import GONE, ON_DISCONNECT
from service.modelset import ModelSet
from service.runtime.batcher import BatcherClosed, InferenceFailed, QueueFull, RequestTimeout
from service.runtime.model import ModelRuntime
from service.runtime.model_queue import RETRY_AFTER_S, Inputs


def model_set(request: Request) -> ModelSet:
    return request.app.state.models


def settings(request: Request) -> Settings:
    return request.app.state.settings


def model_for(models: ModelSet, name: str | None, endpoint: str, version: str | None = None) -> ModelRuntime:
    """The named model (a pinned version of it when `version` is given), or the endpoint's default when
    `name` is None; 404 naming what is available. Unpinned, a model with a canary sends it its share."""
    name = name or models.default(endpoint)
    if name is None:
        raise ApiError(503, f"no model loaded that can serve /{endpoint}")
    if version is not None:
        pinned = models.version(name, version)
        if pinned is None:
            known = [m.entry.version for m in models.versions_of(name)]
            if not known and name not in models.models:
                raise ApiError(404, f"model {name!r} not found{models.unavailable(name)}")
            raise ApiError(404, f"model {name!r} has no version {version!r}; its versions: {', '.join(known) or 'none'}")
        return pinned
    model = models.models.get(name)
    if model is None:
        raise ApiError(404, f"model {name!r} not found{models.unavailable(name)}")
    canary = models.canaries.get(name)
    if canary is not None and random.random() < canary[1]:
        return canary[0]
    return model


async def run(models: ModelSet, model: ModelRuntime, size: int, inputs: Inputs, finish: Callable[[Any], Any],
              timeout_s: float, raw: bool = False, scope: MutableMapping[str, Any] | None = None) -> Any:
    """Queue the job on the model's queue (from `models`, the set the model came from) and await what
    `finish` made of its output (a response; a message for gRPC). Cancelled, the future is cancelled with
    it and the job is dropped before it runs. `scope` (HTTP): when the service's protocol reports the client
    gone, the future is cancelled the same way (uvicorn never cancels the handler of a client that left: its
    queued work would run, and be encoded, for nobody); no timer and no task per request."""
    context = logs.request_context.get()
    if context is not None:
        context["model"], context["version"] = model.name, model.entry.version
    try:
        future = models.queues[model.key].submit(size, inputs, finish, raw, timeout_s, context)
    except (QueueFull, BatcherClosed) as full:
        raise ApiError(503, f"{full}; retry shortly", {"Retry-After": RETRY_AFTER_S}) from None
    gone = scope.get(ON_DISCONNECT) if scope is not None else None  # service/http_protocol.py: called
    if gone is not None:                                             # when the client's connection is lost
        gone.append(future.cancel)
    try:
        return await future
    except asyncio.CancelledError:
        if gone is not None and scope is not None and scope.get(GONE):
            raise ApiError(499, "the client closed the connection") from None
        raise
    except RequestTimeout as err:
        raise ApiError(504, str(err)) from None
    except InferenceFailed as err:  # logged where it happened
        raise ApiError(500, str(err)) from None
    finally:
        if gone is not None and future.cancel in gone:
            gone.remove(future.cancel)
