"""The one batching primitive, used by the workers (a model's requests) and by the inference process (the
batches every worker sends it): a bounded queue, a size cap, deadlines, and a few threads that take what
is queued, run it as one call and hand each job its own rows.

What a batch is made of and how its answers travel differ between the two users; the rules do not:
- the queue is bounded: a job that finds `max_queued` waiting is refused with QueueFull;
- a batch takes jobs in order up to `max_batch` images, waiting at most `max_wait_s` after the oldest
  arrived for it to fill; one job larger than `max_batch` runs alone;
- a job whose waiter is gone, or whose deadline passed while it queued, is dropped before it costs a run
  (the latter answered with RequestTimeout);
- every job taken is delivered exactly once, by construction: `_serve_batch` and `_finish_and_deliver`
  deliver in a `finally`, whatever raised (the model, the inputs, the encoding, a metric, the watch); a
  batch thread never dies of an exception, and `close` fails what is left when a thread is stuck.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

log = logging.getLogger("digitgen.batcher")


class QueueFull(Exception):
    """The queue is at its bound; try again shortly."""


class BatcherClosed(Exception):
    """The batcher takes no more jobs (its model is being retired)."""


class InferenceFailed(Exception):
    """The model, its inputs or the response's encoding raised; the message says which and why (logged)."""


class RequestTimeout(Exception):
    """The job was not answered before its deadline."""


@dataclass(eq=False, slots=True)
class Job:
    size: int  # rows
    payload: Any  # what `run` stacks and `finish` answers from: the user's own
    deadline: float  # time.monotonic() past which nobody waits for the answer
    gone: Callable[[], bool]  # True once nobody waits (a timed-out future, a closed connection)
    waiter: Any = None  # what `deliver` resolves
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its batch began (0: not yet)


class Observer(Protocol):
    def queued(self, delta: int) -> None: ...
    def waited(self, seconds: float) -> None: ...
    def ran(self, seconds: float, images: int) -> None: ...


class Unobserved:
    def queued(self, delta: int) -> None:
        pass

    def waited(self, seconds: float) -> None:
        pass

    def ran(self, seconds: float, images: int) -> None:
        pass


Run = Callable[[list[Job]], np.ndarray]  # the batch's jobs -> its output rows, in job order
Finish = Callable[[Job, np.ndarray], Any]  # one job and its rows -> its answer
Deliver = Callable[[list[Job], list[Any]], None]  # jobs and their answers (or exceptions): resolve them


class Batcher:
    def __init__(self, name: str, run: Run, finish: Finish, deliver: Deliver, *, max_batch: int, max_queued: int,
                 max_wait_s: float = 0.0, threads: int = 1, offload: Executor | None = None,
                 inline: Callable[[list[Job], np.ndarray], bool] | None = None,
                 prepare: Callable[[list[Job], np.ndarray], np.ndarray] | None = None,
                 watch: Callable[[np.ndarray], None] | None = None, observer: Observer | None = None):
        self.name, self.max_batch, self.max_queued, self.max_wait_s = name, max_batch, max_queued, max_wait_s
        self._run, self._finish, self._deliver_to = run, finish, deliver
        self._offload = offload  # finishes a batch's answers while the next batch runs
        self._inline = inline or (lambda batch, output: True)  # finish on the batch thread: cheaper than the hop
        self._prepare = prepare or (lambda batch, output: output)  # once per batch, before the jobs' finish
        self._watch = watch  # sees every batch's output; must return at once
        self._observer = observer or Unobserved()
        self._jobs: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._running: dict[int, float] = {}  # thread id -> when its batch started running
        self._threads = [threading.Thread(target=self._serve, name=f"batch-{name}", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise BatcherClosed(f"model {self.name}: no longer served here")
            if len(self._jobs) >= self.max_queued:
                raise QueueFull(f"model {self.name}: {len(self._jobs)} requests queued")
            self._jobs.append(job)
            self._wake.notify()
        self._observer.queued(1)

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def busy_for(self) -> float:
        """Seconds the longest-running batch has been running (0: none is)."""
        started = list(self._running.values())
        return time.monotonic() - min(started) if started else 0.0

    def close(self, timeout_s: float) -> bool:
        """Stop after the jobs already queued, waiting at most timeout_s for the threads; what is still
        queued then (a thread stuck in the model) is failed. False when a thread did not finish."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._wake:
            left, self._jobs = list(self._jobs), deque()
        if left:
            self._observer.queued(-len(left))
            self._deliver(left, [InferenceFailed(f"model {self.name}: retired before this request ran")] * len(left))
        stuck = [t for t in self._threads if t.is_alive()]
        if stuck:
            log.error("model %s: %d batch thread(s) still running after %.0f s; left behind", self.name,
                      len(stuck), timeout_s)
        return not stuck

    def _take(self) -> list[Job] | None:
        with self._wake:
            while True:  # with several threads, another may take every job while this one waits to fill
                while not self._jobs:
                    if self._closed:
                        return None
                    self._wake.wait()
                fill_until = self._jobs[0].enqueued + self.max_wait_s
                while self._jobs and not self._closed and sum(j.size for j in self._jobs) < self.max_batch:
                    left = fill_until - time.monotonic()
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
        self._observer.queued(-len(batch))
        return batch

    def _serve(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._serve_batch(batch)
            except Exception:  # _serve_batch delivers in its finally; nothing may end this thread
                log.exception("model %s: batch thread error", self.name)

    def _serve_batch(self, batch: list[Job]) -> None:
        live: list[Job] = []
        results: list[Any] | None = None
        try:
            now = time.monotonic()
            expired: list[Job] = []
            for job in batch:  # one pass: the usual batch has no job gone or late
                if job.gone():
                    continue
                (live if job.deadline > now else expired).append(job)
            if expired:
                self._deliver(expired, [RequestTimeout(f"model {self.name}: its deadline passed while it queued")]
                              * len(expired))
            if not live:
                return
            for job in live:
                job.started = now
                self._observer.waited(now - job.enqueued)
            key = threading.get_ident()
            self._running[key] = time.monotonic()
            try:
                output = self._run(live)
            finally:
                ran = time.monotonic() - self._running.pop(key)
            self._observer.ran(ran, len(output))
            self._see(output)
            if self._offload is not None and not self._inline(live, output):
                self._offload.submit(self._finish_and_deliver, live, output)
                live = []  # delivered by the offload thread now
                return
            results = self._finish_all(live, output)
        except Exception as err:
            results = self._failed(live, err)
        finally:
            if live:
                self._deliver(live, results if results is not None else self._failed(live, None))

    def _finish_and_deliver(self, batch: list[Job], output: np.ndarray) -> None:
        results = None
        try:
            results = self._finish_all(batch, output)
        finally:
            self._deliver(batch, results if results is not None else self._failed(batch, None))

    def _finish_all(self, batch: list[Job], output: np.ndarray) -> list[Any]:
        """Each job's answer from its own rows; one job's failure is its own (a failure to prepare the batch's
        rows is every job's)."""
        rows = self._prepare(batch, output)
        results, start = [], 0
        for job in batch:
            try:
                results.append(self._finish(job, rows[start:start + job.size]))
            except Exception as err:
                log.error("model %s: answering a request failed: %r", self.name, err)
                results.append(InferenceFailed(f"model {self.name}: encoding the response failed: {err}"))
            start += job.size
        return results

    def _failed(self, batch: list[Job], err: BaseException | None) -> list[Any]:
        reason = f"model {self.name}: inference failed for a batch of {sum(j.size for j in batch)}: " \
                 f"{err if err is not None else 'interrupted'}"
        log.error("%s", reason)
        return [InferenceFailed(reason)] * len(batch)

    def _see(self, output: np.ndarray) -> None:
        if self._watch is None:
            return
        try:
            self._watch(output)
        except Exception as err:  # a watcher must never fail the batch it watches
            log.warning("model %s: watching a batch failed: %r", self.name, err)

    def _deliver(self, batch: list[Job], results: list[Any]) -> None:
        try:
            self._deliver_to(batch, results)
        except Exception:
            log.exception("model %s: delivering %d answer(s) failed", self.name, len(batch))
