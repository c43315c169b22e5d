"""A model's requests from the event loop, as jobs of the runtime's Batcher: `submit` returns an asyncio
future the route awaits. Inputs are drawn and responses encoded off the event loop (the batch thread, or
an encode thread for larger batches while the next one runs); all of a batch's futures are set with one
call into the loop. A request whose client went away or timed out is dropped before it costs a run.

The models are exported in eval mode, so a row depends only on its own inputs: a request's output is the
same whatever it was batched with (tested)."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, cast

import numpy as np

from service import imaging
from service.metrics import Metrics
from service.runtime.batcher import Batcher, Job, RequestTimeout
from service.runtime.model import ModelRuntime

log = logging.getLogger("digitgen.queue")

# A batch of raw outputs (V2: bytes and a small JSON header) or of at most this many images (a 28x28 PNG
# takes 9 us) is encoded on the batch thread: handing it to an encode thread costs more than the work.
INLINE_IMAGES = 4
RETRY_AFTER_S = "1"  # what a refused request is told (Retry-After): the queue drains in milliseconds
CLOSE_TIMEOUT_S = 30.0

Inputs = Callable[[], tuple[np.ndarray, "np.ndarray | None"]]
Watch = Callable[[ModelRuntime, np.ndarray], None]  # (the model, its batch's output [N, 1, 28, 28])


@dataclass(eq=False, slots=True)
class Request(Job):
    """A request's job: `payload` is its inputs callable, `waiter` its future."""
    finish: Callable[[np.ndarray], Any] = repr  # pixels [size, 28, 28] uint8 (or, raw, the output) -> response
    raw: bool = False
    timer: asyncio.TimerHandle | None = None


class Observed:
    """The batcher's events as this worker's metrics for one model."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._queued = metrics.queued.labels(model, version)
        self._wait = metrics.queue_wait.labels(model, version)
        self._inference = metrics.inference.labels(model, version)
        self._batch = metrics.batch.labels(model, version)

    def queued(self, delta: int) -> None:
        self._queued.inc(delta)

    def waited(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def ran(self, seconds: float, images: int) -> None:
        self._inference.observe(seconds)
        self._batch.observe(images)


class ModelQueue:
    def __init__(self, model: ModelRuntime, *, max_batch: int, max_wait_s: float, max_queued: int, threads: int,
                 encoder: Executor, metrics: Metrics, watch: Watch | None = None):
        self.model = model
        self.batcher = Batcher(model.name, self._run, _finish, _deliver, max_batch=max_batch, max_wait_s=max_wait_s,
                               max_queued=max_queued, threads=threads, offload=encoder, inline=_inline,
                               prepare=_pixels_once,
                               watch=(lambda output: watch(model, output)) if watch else None,
                               observer=Observed(metrics, model.name, model.entry.version))

    @property
    def alive(self) -> bool:
        return self.batcher.alive

    def submit(self, size: int, inputs: Inputs, finish: Callable[[np.ndarray], Any], raw: bool = False,
               timeout_s: float = 30.0, context: dict | None = None) -> asyncio.Future:
        """Queue a request from the event loop; await the future for `finish(pixels)` (raw: `finish(output)`).
        QueueFull or BatcherClosed when it cannot be queued. `context`: the request's access-log fields,
        given the job (its queue wait)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = Request(size, inputs, time.monotonic() + timeout_s, future.done, future, time.monotonic(), finish=finish,
                          raw=raw)
        self.batcher.submit(request)
        if context is not None:
            context["job"] = request
        request.timer = loop.call_later(timeout_s, _expire, future, self.model.name, timeout_s)
        return future

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop after the requests already queued (at most timeout_s), then let go of the model."""
        self.batcher.close(timeout_s)
        self.model.close()

    def _run(self, jobs: list[Job]) -> np.ndarray:
        zs, ys = zip(*(job.payload() for job in jobs))
        z = np.concatenate(zs) if len(jobs) > 1 else zs[0]
        y = None if ys[0] is None else np.concatenate(ys) if len(jobs) > 1 else ys[0]
        return self.model.run(z, y)


def _inline(jobs: list[Job], output: np.ndarray) -> bool:
    return len(output) <= INLINE_IMAGES or all(cast(Request, job).raw for job in jobs)


def _pixels_once(jobs: list[Job], output: np.ndarray) -> np.ndarray:
    """The batch's pixels, converted once rather than per request, unless a raw (V2) request is in it."""
    return output if any(cast(Request, job).raw for job in jobs) else imaging.to_uint8(output)


def _finish(job: Job, rows: np.ndarray) -> Any:
    request = cast(Request, job)  # this queue submits nothing else
    if request.raw:
        return request.finish(rows)
    return request.finish(rows if rows.dtype == np.uint8 else imaging.to_uint8(rows))


def _deliver(jobs: list[Job], results: list[Any]) -> None:
    """One call into the event loop per batch (not per job) sets every job's future."""
    try:
        jobs[0].waiter.get_loop().call_soon_threadsafe(_set_results, jobs, results)
    except RuntimeError:  # the loop is closed: the app is gone, nobody awaits these futures
        log.warning("%d response(s) finished after the event loop closed", len(jobs))


def _set_results(jobs: list[Job], results: list[Any]) -> None:
    for job, result in zip(cast(list[Request], jobs), results):
        if job.timer is not None:
            job.timer.cancel()
        future = job.waiter
        if future.done():  # timed out, or the client went away and the request was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _expire(future: asyncio.Future, model: str, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(f"model {model}: no answer within {timeout_s:g} s "
                                            f"(DIGITGEN_REQUEST_TIMEOUT_S)"))
