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
from typing import Any, Awaitable, Callable

from fastapi import Request

from service import logs
from service.config import Settings
from service.errors import ApiError
from service.modelset import ModelSet
from service.runtime.batcher import BatcherClosed, InferenceFailed, QueueFull, RequestTimeout
from service.runtime.model import ModelRuntime
from service.runtime.model_queue import RETRY_AFTER_S, Inputs

WATCH_AFTER_S = 0.05  # a request still waiting this long listens for its client leaving


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
              timeout_s: float, raw: bool = False, receive: Callable[[], Awaitable[Any]] | None = None) -> Any:
    """Queue the job on the model's queue (from `models`, the set the model came from) and await what
    `finish` made of its output (a response; a message for gRPC). Cancelled, the future is cancelled with
    it and the job is dropped before it runs. `receive` (HTTP): a request still waiting after WATCH_AFTER_S
    listens for its client leaving, and then is dropped the same way (uvicorn never cancels the handler of a
    client that left: its queued work would run, and be encoded, for nobody)."""
    context = logs.request_context.get()
    if context is not None:
        context["model"], context["version"] = model.name, model.entry.version
    try:
        future = models.queues[model.key].submit(size, inputs, finish, raw, timeout_s, context)
    except (QueueFull, BatcherClosed) as full:
        raise ApiError(503, f"{full}; retry shortly", {"Retry-After": RETRY_AFTER_S}) from None
    watch = _Watch(future, receive) if receive is not None else None
    try:
        return await future
    except asyncio.CancelledError:
        if watch is not None and watch.gone:
            raise ApiError(499, "the client closed the connection") from None
        raise
    except RequestTimeout as err:
        raise ApiError(504, str(err)) from None
    except InferenceFailed as err:  # logged where it happened
        raise ApiError(500, str(err)) from None
    finally:
        if watch is not None:
            watch.stop()


class _Watch:
    """After WATCH_AFTER_S, a task reading the request's ASGI messages until the client leaves (then the
    request's future is cancelled); nothing at all for the requests answered before."""

    def __init__(self, future: asyncio.Future, receive: Callable[[], Awaitable[Any]]):
        self.future, self.receive, self.gone = future, receive, False
        self.task: asyncio.Task | None = None
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        if not self.future.done():
            self.task = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        """Only for a request whose body the route has read already (or that has none): the messages read
        here are gone for the route."""
        try:
            while not self.future.done():
                if (await self.receive())["type"] == "http.disconnect":
                    self.gone = True
                    self.future.cancel()
                    return
        except Exception:  # the server's receive failed: nothing to watch; the request goes on as it would
            return

    def stop(self) -> None:
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

