"""Several uvicorn workers, each listening on its own SO_REUSEPORT socket (Linux), under a supervisor.

uvicorn's own --workers shares one listening socket among the workers: a burst of new connections (a
proxy opening its keep-alive pool, a load generator) can all be accepted by whichever worker wakes first,
and they stay there. Measured here with 64 persistent connections: 476 CPU ticks on one worker and 0 on
the other, 3,800 instead of 6,200 requests/s. With a socket per worker the kernel spreads connections
across them by hash.

The supervisor tells a failed start from a death by readiness, not by age: a worker warms its models
before it listens (so the kernel never hands a cold worker a connection) and then signals. One of the first
workers that exits before that is a failed start (a bad setting or
model folder: restarting would only loop), and the service stops; a worker that was ready and died is
replaced, at once when it had served STABLE_S, else after a growing delay (a crash loop re-running warm-up
and the gate back to back would starve the others), as is a replacement that fails to start; its live
metrics are dropped from the shared files. SIGHUP (reload) is forwarded to every worker; it stays blocked
in a worker from its first instruction until the app listens for it (service/reload.py). Workers die with
the supervisor (service/orphans.py): a killed supervisor leaves nobody serving on its port.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import uvicorn
from prometheus_client import multiprocess

from service.orphans import die_with_parent

log = logging.getLogger("digitgen.workers")

RETRY_DELAYS_S = (1, 2, 4, 8, 16, 30)  # before restarting a worker that keeps failing, then every 30 s
STABLE_S = 60.0  # a worker that served this long before it died is replaced at once
AppFactory = Callable[..., Any]  # (on_ready=callable) -> ASGI app; picklable (it crosses to spawned workers)


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


def run(app_factory: AppFactory, options: dict, workers: int) -> int:
    """Serve the app with `workers` processes (a socket each, Linux), or in this process; the exit
    status. `options`: uvicorn.Config's host, port, log_level, access_log. OSError when the port is taken."""
    if workers > 1 and supported():
        return serve(app_factory, options, workers)
    if workers > 1:
        log.warning("workers=%d needs Linux (a socket per worker); serving with one process", workers)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # until the app listens for it
    uvicorn.Server(uvicorn.Config(app_factory(), **options)).run()
    return 0


@dataclass
class Worker:
    process: Any  # a spawned multiprocessing Process; None: waiting out a retry delay
    ready: Any  # a multiprocessing Event, set once the worker's models are warmed
    first: bool  # one of the workers the service started with
    failures: int = 0  # failed starts or early deaths in a row in this slot
    retry_at: float = 0.0
    started: float = 0.0  # time.monotonic()


class Supervisor:
    """Starts the workers, replaces the dead, forwards SIGHUP, stops them on SIGINT/SIGTERM."""

    def __init__(self, app_factory: AppFactory, options: dict):
        self.app_factory, self.options = app_factory, options
        self.context = multiprocessing.get_context("spawn")
        self.stop = threading.Event()
        self.workers: list[Worker] = []

    def start(self, first: bool, failures: int = 0) -> Worker:
        ready = self.context.Event()
        process = self.context.Process(target=_worker, args=(self.app_factory, self.options, ready, os.getpid()),
                                       name="digitgen-worker")
        with reload_signal_blocked():  # the child inherits the mask: SIGHUP cannot kill it while it starts
            process.start()
        return Worker(process, ready, first, failures, started=time.monotonic())

    def forward_reload(self, *_) -> None:
        """SIGHUP: each worker reloads its models (service/reload.py)."""
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGHUP)

    def check(self, i: int) -> bool:
        """Look after slot i: replace a dead worker. False when the service must stop."""
        worker = self.workers[i]
        if worker.process is None:
            if time.monotonic() >= worker.retry_at:
                self.workers[i] = self.start(first=False, failures=worker.failures)
            return True
        if worker.process.is_alive():
            return True
        pid, status = worker.process.pid, worker.process.exitcode
        _drop_metrics(pid)
        lived = time.monotonic() - worker.started
        if worker.ready.is_set() and lived >= STABLE_S:
            log.warning("worker %s exited (status %s) after %.0f s; starting another", pid, status, lived)
            self.workers[i] = self.start(first=False)
            return True
        if not worker.ready.is_set() and worker.first:
            log.error("worker %s exited before it was ready (status %s); stopping", pid, status)
            return False
        delay = RETRY_DELAYS_S[min(worker.failures, len(RETRY_DELAYS_S) - 1)]
        log.error("worker %s exited (status %s) %s %.1f s after it started; starting another in %d s "
                  "(%d failure(s) in a row)", pid, status, "ready," if worker.ready.is_set() else "before it was ready,",
                  lived, delay, worker.failures + 1)
        self.workers[i] = Worker(None, worker.ready, False, worker.failures + 1, time.monotonic() + delay)
        return True

    def run(self, count: int) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, self.forward_reload)
        self.workers = [self.start(first=True) for _ in range(count)]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held back since python -m service began
        status = 0
        while not self.stop.wait(0.2):
            if not all([self.check(i) for i in range(len(self.workers))]):
                status = 1
                break
        self.shutdown()
        return status

    def shutdown(self) -> None:
        started = [w.process for w in self.workers if w.process is not None]
        for process in started:
            if process.is_alive():
                process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        for process in started:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


def serve(app_factory: AppFactory, options: dict, workers: int) -> int:
    """Run `workers` processes until SIGINT/SIGTERM; the exit status (1: a worker failed to start)."""
    # Is the port free? Bound without SO_REUSEPORT, or we would join another server's group unnoticed.
    listening_socket(options["host"], options["port"], shared=False).close()
    return Supervisor(app_factory, options).run(workers)


def _drop_metrics(pid: int | None) -> None:
    """A dead worker's live gauges (queued requests) must not stay in the totals of /metrics."""
    if pid and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)


def _worker(app_factory: AppFactory, options: dict, ready, parent: int) -> None:
    """One worker: SIGHUP is still blocked here (inherited), until the app's reloader listens for it."""
    die_with_parent(parent)
    logging.basicConfig(level=options.get("log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # a spawned process starts bare
    sock = listening_socket(options["host"], options["port"])
    app = app_factory(on_ready=ready.set)
    uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
