"""Dynamic batching: concurrent requests for one model share one ONNX Runtime call.

Each model has a queue and a thread (or a few: `threads`) that takes what is queued (up to `max_batch` images, waiting at
most `max_wait` for more once the first job is in), runs the model once on the stacked inputs and
hands each job its own rows. The models are exported in eval mode, so a row depends only on its own
inputs: a request's output is the same whatever it was batched with (tested).

The queue is bounded: a job that finds `max_queued` jobs waiting is refused with `QueueFull` (the app
answers 503 with Retry-After) rather than piling up latency without limit. Every job's future is
resolved, whatever fails: with its response, with `InferenceFailed` (the model or the encoding raised:
a 500 with the reason logged), or with `RequestTimeout` once it has waited `timeout_s` (a 504); a job
whose future is already done (timed out, or its client gone) is dropped before it costs a model run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from service import imaging
from service.metrics import Metrics
from service.registry import LoadedModel

log = logging.getLogger("digitgen.batching")


# A batch of raw outputs (V2: bytes and a small JSON header) or of at most this many images (a 28x28 PNG
# takes 9 us) is encoded on the batch thread: handing it to an encode thread costs more than the work.
INLINE_IMAGES = 4
RETRY_AFTER_S = "1"  # what a refused request is told (Retry-After): the queue drains in milliseconds


class QueueFull(Exception):
    """The model's queue is at its bound; try again shortly."""


class InferenceFailed(Exception):
    """The model or the response's encoding raised; the message says which and why (already logged)."""


class RequestTimeout(Exception):
    """The job was not answered within its timeout."""


Inputs = Callable[[], tuple[np.ndarray, "np.ndarray | None"]]
Watch = Callable[[LoadedModel, np.ndarray], None]  # (the model, its batch's output [N, 1, 28, 28])


@dataclass
class Job:
    size: int  # images
    inputs: Inputs  # -> z [size, latent_dim], y [size, num_classes] or None; run on the batch thread
    finish: Callable[[np.ndarray], Any]  # this job's pixels [size, 28, 28] uint8 (or raw output) -> its response
    future: asyncio.Future
    raw: bool = False  # finish gets the model's own output, [size, 1, 28, 28] float32, not pixels
    enqueued: float = field(default_factory=time.perf_counter)
    timer: asyncio.TimerHandle | None = None  # expires the future after the timeout


class Batcher:
    """One model's queue and the thread that serves it."""

    def __init__(self, model: LoadedModel, max_batch: int, max_wait_s: float, max_queued: int,
                 finisher: Executor, metrics: Metrics, watch: Watch | None = None, threads: int = 1):
        self.model, self.max_batch, self.max_wait_s, self.max_queued = model, max_batch, max_wait_s, max_queued
        self._finisher = finisher  # encodes a batch's responses while the next batch runs
        self._watch = watch  # sees every batch's output, for the live quality figure; must return at once
        self._jobs: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._queue_wait = metrics.queue_wait.labels(model.name)
        self._inference = metrics.inference.labels(model.name)
        self._batch = metrics.batch.labels(model.name)
        self._queued = metrics.queued.labels(model.name)
        # More than one thread: batches in flight at once, for a model whose runs mostly wait on another
        # process (the GPU inference process), so the wait for one hides behind the next.
        self._threads = [threading.Thread(target=self._serve, name=f"batch-{model.name}", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, size: int, inputs: Inputs, finish: Callable[[np.ndarray], Any],
               raw: bool = False, timeout_s: float | None = None) -> asyncio.Future:
        """Queue a job from the event loop; await the returned future for `finish(pixels)` (with `raw`:
        `finish(model output)`). The inputs are drawn on the batch thread: numpy calls release the GIL,
        and each release on the event loop lets another thread in ahead of the next request."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = Job(size, inputs, finish, future, raw=raw)
        with self._wake:
            if self._closed:
                raise RuntimeError(f"model {self.model.name}: the batcher is closed")
            if len(self._jobs) >= self.max_queued:
                raise QueueFull(f"model {self.model.name}: {len(self._jobs)} requests queued")
            self._jobs.append(job)
            self._queued.inc()
            self._wake.notify()
        if timeout_s is not None:
            job.timer = loop.call_later(timeout_s, _expire, future, self.model.name, timeout_s)
        return future

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        """Stop after the jobs already queued, then let go of the model (no set serves it any more)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join()
        if hasattr(self.model, "close"):
            self.model.close()

    def _take(self) -> list[Job] | None:
        """The next batch: the jobs queued now, in order, up to max_batch images, waiting until max_wait
        after the oldest arrived for the batch to fill. One job larger than max_batch runs alone."""
        with self._wake:
            while True:  # with several threads, another may take every job while this one waits to fill
                while not self._jobs:
                    if self._closed:
                        return None
                    self._wake.wait()
                deadline = self._jobs[0].enqueued + self.max_wait_s
                while self._jobs and not self._closed and sum(j.size for j in self._jobs) < self.max_batch:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._jobs:
                    break
            batch = [self._jobs.popleft()]
            images = batch[0].size
            while self._jobs and images + self._jobs[0].size <= self.max_batch:
                images += self._jobs[0].size
                batch.append(self._jobs.popleft())
            self._queued.dec(len(batch))
        return batch

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            batch = [job for job in batch if not job.future.done()]  # timed out or abandoned while queued
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                self._queue_wait.observe(started - job.enqueued)
            try:
                zs, ys = zip(*(job.inputs() for job in batch))
                z = np.concatenate(zs) if len(batch) > 1 else zs[0]
                y = None if ys[0] is None else np.concatenate(ys) if len(batch) > 1 else ys[0]
                ran = time.perf_counter()
                output = self.model.run(z, y)
            except Exception as err:  # the model failed: every job of the batch gets the error
                _fail(batch, f"model {self.model.name}: inference failed for a batch of "
                             f"{sum(job.size for job in batch)}: {err}")
                continue
            self._inference.observe(time.perf_counter() - ran)
            self._batch.observe(len(output))
            if self._watch is not None:
                self._watch(self.model, output)
            if all(job.raw for job in batch) or len(output) <= INLINE_IMAGES:
                _finish(batch, output, self.model.name)  # less work than the hop to an encode thread
                continue
            try:
                self._finisher.submit(_finish, batch, output, self.model.name)
            except RuntimeError as err:  # the encode threads are shutting down
                _fail(batch, f"model {self.model.name}: cannot encode the responses: {err}")


def _finish(batch: list[Job], output: np.ndarray, model: str) -> None:
    """Split the batch's output back per job, encode each job's response, hand them to the event loop.
    Runs on an encode thread: whatever raises here becomes the jobs' InferenceFailed, never a lost future."""
    try:
        pixels = imaging.to_uint8(output) if not all(job.raw for job in batch) else None  # once per batch
        results, start = [], 0
        for job in batch:
            try:
                rows = output if job.raw else pixels
                results.append(job.finish(rows[start:start + job.size]))
            except Exception as err:
                log.error("model %s: encoding a response failed: %r", model, err)
                results.append(InferenceFailed(f"model {model}: encoding the response failed: {err}"))
            start += job.size
    except Exception as err:
        _fail(batch, f"model {model}: converting the batch's output failed: {err!r}")
        return
    _resolve(batch, results)


def _fail(batch: list[Job], reason: str) -> None:
    log.error("%s", reason)
    _resolve(batch, [InferenceFailed(reason)] * len(batch))


def _resolve(batch: list[Job], results: list) -> None:
    """One call into the event loop per batch (not per job) sets every job's future."""
    try:
        batch[0].future.get_loop().call_soon_threadsafe(_set_results, batch, results)
    except RuntimeError:  # the loop is closed: the app is gone, nobody awaits these futures
        log.warning("%d response(s) finished after the event loop closed", len(batch))


def _set_results(batch: list[Job], results: list) -> None:
    for job, result in zip(batch, results):
        if job.timer is not None:
            job.timer.cancel()
        if job.future.done():  # timed out, or the client went away and the request was cancelled
            continue
        if isinstance(result, Exception):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)


def _expire(future: asyncio.Future, model: str, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(f"model {model}: no answer within {timeout_s:g} s "
                                            f"(DIGITGEN_REQUEST_TIMEOUT_S)"))
