"""Several uvicorn workers, each listening on its own SO_REUSEPORT socket (Linux), under a supervisor.

uvicorn's own --workers shares one listening socket among the workers: a burst of new connections (a
proxy opening its keep-alive pool, a load generator) can all be accepted by whichever worker wakes first,
and they stay there. Measured here with 64 persistent connections: 476 CPU ticks on one worker and 0 on
the other, 3,800 instead of 6,200 requests/s. With a socket per worker the kernel spreads connections
across them by hash.

The supervisor decides what every worker serves (service/coordinator.py, service/lifecycle.py): a worker
starts with the decision being served, prepares it (opens and warms its models) before it listens (so the
kernel never hands a cold worker a connection) and listens once told to commit it. The supervisor tells a
failed start from a death by readiness, not by age: one of the first workers that exits before it serves is
a failed start (a bad setting or model folder: restarting would only loop), and the service stops; a worker
that was ready and died is replaced, at once when it had served STABLE_S, else after a growing delay (a
crash loop re-running warm-up back to back would starve the others), as is a replacement that fails to
start; its live metrics are dropped from the shared files. SIGHUP (reload) is the supervisor's: it decides
once and the workers switch together. Workers die with the supervisor (service/orphans.py): a killed
supervisor leaves nobody serving on its port.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import uvicorn
from prometheus_client import CollectorRegistry, Counter, multiprocess, values

from service import http_protocol, logs
from service.coordinator import Coordinator
from service.lifecycle import Lifecycle
from service.modelset import Decision, ReloadError
from service.orphans import die_with_parent

log = logging.getLogger("digitgen.workers")

RETRY_DELAYS_S = (1, 2, 4, 8, 16, 30)  # before restarting a worker that keeps failing, then every 30 s
STABLE_S = 60.0  # a worker that served this long before it died is replaced at once
SHUTDOWN_S = 30.0  # workers still running this long after SIGTERM are killed
AppFactory = Callable[..., Any]  # (supervised=Supervised) -> ASGI app; picklable (it crosses to spawned workers)


@dataclass(frozen=True)
class Supervised:
    """What a worker gets from its supervisor: the channel, and the decision to serve first."""
    channel: Any  # a multiprocessing Connection
    decision: Decision
    failure: tuple[str, str] | None  # the last reload's, shown in /readyz
    slot: int = 0  # which worker it is (worker-N in the logs): a replacement takes its slot's number


def supported() -> bool:
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def listening_socket(host: str, port: int, shared: bool = True) -> socket.socket:
    """A socket bound to host:port; `shared`: other sockets of this user may bind it too (the kernel
    balances connections across them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@contextmanager
def reload_signal_blocked():
    """SIGHUP held back in this thread (and in processes and threads started meanwhile, which inherit the
    mask) until the block ends; a SIGHUP that arrives meanwhile is delivered then."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run(app_factory: AppFactory, options: dict, workers: int, lifecycle: Lifecycle) -> int:
    """Serve the app with `workers` processes (a socket each, Linux), or in this process; the exit
    status. `options`: uvicorn.Config's host, port, log_level, access_log. OSError when the port is taken."""
    if workers > 1 and supported():
        return serve(app_factory, options, workers, lifecycle)
    if workers > 1:
        log.warning("workers=%d needs Linux (a socket per worker); serving with one process", workers)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # until the app listens for it
    options = http_protocol.uvicorn_options({key: value for key, value in options.items() if key != "log_format"})
    uvicorn.Server(uvicorn.Config(app_factory(), **options)).run()
    return 0


class Outbox:
    """Messages to one worker, sent by a thread of their own: a worker that stops reading (frozen, swapping)
    blocks that thread, never the supervisor's loop (which replaces the dead and times reloads out)."""

    def __init__(self, channel):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send, args=(channel,), name="outbox", daemon=True).start()

    def put(self, message: tuple | None) -> None:
        self._queue.put(message)

    def _send(self, channel) -> None:
        while (message := self._queue.get()) is not None:
            try:
                channel.send(message)
            except (OSError, ValueError):  # it died: check() replaces it
                return


@dataclass
class Worker:
    process: Any  # a spawned multiprocessing Process; None: waiting out a retry delay
    channel: Any  # the supervisor's end of its Connection (read by the supervisor's loop)
    outbox: Outbox | None  # what is sent to it
    first: bool  # one of the workers the service started with
    failures: int = 0  # failed starts or early deaths in a row in this slot
    retry_at: float = 0.0
    started: float = 0.0  # time.monotonic()
    ready: bool = False  # it serves: it committed its first set
    generation: int = 0  # the decision it serves
    held: int | None = None  # prepared while a reload ran: waits for its outcome (service/coordinator.py)
    committing: int | None = None  # told to commit its first set, not yet serving it

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def send(self, message: tuple) -> None:
        if self.outbox is not None:
            self.outbox.put(message)


class Supervisor:
    """Starts the workers, replaces the dead, decides their models (SIGHUP), stops them on SIGINT/SIGTERM."""

    def __init__(self, app_factory: AppFactory, options: dict, lifecycle: Lifecycle):
        self.app_factory, self.options = app_factory, options
        self.context = multiprocessing.get_context("spawn")
        self.stop = threading.Event()
        self.workers: list[Worker] = []
        self.coordinator = Coordinator(lifecycle, _reload_counter())

    def start(self, slot: int, first: bool, failures: int = 0) -> Worker:
        ours, theirs = self.context.Pipe()
        supervised = Supervised(theirs, self.coordinator.served, self.coordinator.failure, slot)
        process = self.context.Process(target=_worker, args=(self.app_factory, self.options, supervised, os.getpid()),
                                       name="digitgen-worker")
        with reload_signal_blocked():  # the child inherits the mask: SIGHUP cannot kill it while it starts
            process.start()
        theirs.close()
        return Worker(process, ours, Outbox(ours), first, failures, started=time.monotonic())

    def forward_reload(self, *_) -> None:
        """SIGHUP: decide the next set once, for every worker (service/coordinator.py)."""
        self.coordinator.request()

    def check(self, i: int) -> bool:
        """Look after slot i: replace a dead worker. False when the service must stop."""
        worker = self.workers[i]
        if worker.process is None:
            if time.monotonic() >= worker.retry_at:
                self.workers[i] = self.start(i, first=False, failures=worker.failures)
            return True
        if worker.process.is_alive():
            return True
        pid, status = worker.process.pid, worker.process.exitcode
        _drop_metrics(pid)
        self.coordinator.gone(worker, self.workers)
        if worker.outbox is not None:
            worker.outbox.put(None)
        lived = time.monotonic() - worker.started
        if worker.ready and lived >= STABLE_S:
            log.warning("worker %s exited (status %s) after %.0f s; starting another", pid, status, lived)
            self.workers[i] = self.start(i, first=False)
            return True
        if not worker.ready and worker.first:
            log.error("worker %s exited before it was ready (status %s); stopping", pid, status)
            return False
        delay = RETRY_DELAYS_S[min(worker.failures, len(RETRY_DELAYS_S) - 1)]
        log.error("worker %s exited (status %s) %s %.1f s after it started; starting another in %d s "
                  "(%d failure(s) in a row)", pid, status, "ready," if worker.ready else "before it was ready,",
                  lived, delay, worker.failures + 1)
        self.workers[i] = Worker(None, None, None, False, worker.failures + 1, time.monotonic() + delay)
        return True

    def run(self, count: int) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, self.forward_reload)
        try:
            self.coordinator.start()
        except ReloadError as err:
            log.error("nothing to serve: %s", err)
            return 1
        self.workers = [self.start(i, first=True) for i in range(count)]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held back since python -m service began
        status = 0
        while not self.stop.is_set():
            self.listen(0.2)
            self.coordinator.tick(self.workers)
            if not all([self.check(i) for i in range(len(self.workers))]):
                status = 1
                break
        self.shutdown()
        self.coordinator.close()
        return status

    def listen(self, timeout: float) -> None:
        """Pass what the workers say to the coordinator, for at most `timeout` seconds."""
        channels = {id(w.channel): w for w in self.workers if w.channel is not None and not w.channel.closed}
        try:
            ready = multiprocessing.connection.wait([w.channel for w in channels.values()], timeout)
        except OSError:
            return
        for channel in ready:
            assert isinstance(channel, multiprocessing.connection.Connection)
            worker = channels[id(channel)]
            try:
                message = channel.recv()
            except (EOFError, OSError):  # it died: check() sees to it; stop listening to it
                channel.close()
                continue
            self.coordinator.received(worker, message, self.workers)

    def shutdown(self) -> None:
        started = [w.process for w in self.workers if w.process is not None]
        for process in started:
            if process.is_alive():
                process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        deadline = time.monotonic() + SHUTDOWN_S  # one deadline for all, not SHUTDOWN_S each
        for process in started:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def serve(app_factory: AppFactory, options: dict, workers: int, lifecycle: Lifecycle) -> int:
    """Run `workers` processes until SIGINT/SIGTERM; the exit status (1: a worker failed to start)."""
    # Is the port free? Bound without SO_REUSEPORT, or we would join another server's group unnoticed.
    listening_socket(options["host"], options["port"], shared=False).close()
    return Supervisor(app_factory, options, lifecycle).run(workers)


def _reload_counter() -> Counter | None:
    """digitgen_reloads_total, counted once per reload by the supervisor, in the workers' shared metric
    files. prometheus_client picks its value class at import, before `python -m service` set the folder:
    the file-backed class is lent while the counter and both its series are made, then put back."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return None
    previous = values.ValueClass
    values.ValueClass = values.MultiProcessValue()
    try:
        counter = Counter("digitgen_reloads", "model set reloads (SIGHUP) by result: ok or failed", ["result"],
                          registry=CollectorRegistry())
        for result in ("ok", "failed"):
            counter.labels(result)
    finally:
        values.ValueClass = previous
    return counter


def _drop_metrics(pid: int | None) -> None:
    """A dead worker's live gauges (queued requests) must not stay in the totals of /metrics."""
    if pid and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)


def _worker(app_factory: AppFactory, options: dict, supervised: Supervised, parent: int) -> None:
    """One worker: SIGHUP is still blocked here (inherited), until the app ignores it (the supervisor's)."""
    die_with_parent(parent)
    options = dict(options)
    logs.configure(options.get("log_level", "info"), options.pop("log_format", "text"),
                   f"worker-{supervised.slot}")  # a spawned process starts bare
    options = http_protocol.uvicorn_options(options)
    sock = listening_socket(options["host"], options["port"])
    app = app_factory(supervised=supervised)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run(sockets=[sock])
    if not server.started:  # its start-up failed (logged): not a clean exit
        sys.exit(3)
