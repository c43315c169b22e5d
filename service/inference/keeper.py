"""The supervisor's side of the inference process: start it before the workers, check its heartbeat, and
replace it when it exits, stops answering within DIGITGEN_INFERENCE_DEADLINE_S, or has had a batch
running longer than that (a device call that never returns). Restarts back off (RESTART_DELAYS_S) while
the process keeps failing within STABLE_S of its start; the process dies with the supervisor.

While it is gone, the workers' models run on their own CPU sessions and reattach when it is back
(service/runtime/attach.py): nothing here waits on a worker, and no worker waits on this.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from service.config import Settings
from service.inference import server, wire
from service.plan import Plan

log = logging.getLogger("digitgen.keeper")

START_TIMEOUT_S = 120.0  # loading CUDA and cuDNN takes seconds; a process not listening by then has failed
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0  # a process that ran this long before it failed starts the backoff anew


class InferenceProcessError(Exception):
    """The inference process could not start; the message says why."""


class Keeper:
    def __init__(self, settings: Settings, plan: Plan, address: Path, target: Callable[..., Any] = server.main):
        self.settings, self.plan, self.address, self.target = settings, plan, address, target
        self.deadline_s = settings.inference_deadline_s
        self.context = multiprocessing.get_context("spawn")
        self.stopping = threading.Event()
        self.restarts: list[float] = []  # each replacement's delay, in order: the backoff, for logs and tests
        self._link: socket.socket | None = None
        self.process = self._start()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="inference-keeper")
        self.thread.start()

    def _start(self) -> Any:
        """A running, listening process; InferenceProcessError when it exits or hangs first."""
        self.address.unlink(missing_ok=True)  # a dead process's socket
        ready = self.context.Event()
        process = self.context.Process(target=self.target, name="digitgen-inference", daemon=True,
                                       args=(self.settings, self.plan, str(self.address), ready, os.getpid()))
        process.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.05):
            if not process.is_alive() or time.monotonic() > deadline or self.stopping.is_set():
                process.kill()
                process.join()
                self.process = process
                raise InferenceProcessError(f"the inference process did not start (status {process.exitcode})")
        return process

    def _watch(self) -> None:
        failures, started = 0, time.monotonic()
        every = max(0.05, self.deadline_s / 5)
        while not self.stopping.is_set():
            if self.process.is_alive():
                problem = self._heartbeat()
                if problem is None:
                    self.stopping.wait(every)
                    continue
                log.error("inference process %s %s; killing it", self.process.pid, problem)
                self.process.kill()
                self.process.join()
            self._close_link()
            failures = failures + 1 if time.monotonic() - started < STABLE_S else 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S)) - 1]
            self.restarts.append(delay)
            log.warning("inference process %s exited (status %s); starting another in %.1f s (%d failure(s) in a row)",
                        self.process.pid, self.process.exitcode, delay, failures)
            if self.stopping.wait(delay):
                return
            started = time.monotonic()
            try:
                self.process = self._start()
                log.info("inference process %s started", self.process.pid)
            except InferenceProcessError as err:
                log.error("%s", err)

    def _heartbeat(self) -> str | None:
        """None when the process answered in time and no batch of it has run past the deadline; else what
        is wrong."""
        try:
            if self._link is None:
                self._link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._link.settimeout(self.deadline_s)
                self._link.connect(str(self.address))
            wire.send(self._link, wire.PING)
            kind, answer = wire.receive(self._link)
        except TimeoutError:
            self._close_link()
            return f"did not answer its heartbeat within {self.deadline_s:g} s"
        except (OSError, EOFError, wire.ProtocolError) as err:
            self._close_link()
            if not self.process.is_alive():
                return "exited"
            return f"refused its heartbeat ({err or type(err).__name__})"
        if answer.get("busy_s", 0.0) > self.deadline_s:
            return f"has had a batch running for {answer['busy_s']:.1f} s"
        return None

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self._close_link()
        self.process.terminate()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@contextmanager
def serving(settings: Settings, plan: Plan) -> Iterator[Plan]:
    """The plan the workers get: with the inference process running and its socket in it, when the plan
    has one; unchanged otherwise."""
    if not plan.inference_process:
        yield plan
        return
    try:
        folder = Path(tempfile.mkdtemp(prefix="digitgen-inference-"))  # 0700: only this user reaches the socket
    except OSError as err:
        raise InferenceProcessError(f"no folder for its socket: {err}") from None
    try:
        # A SIGHUP while CUDA starts must not end the supervisor; nothing to reload yet (the workers read the
        # manifest as it is when they start).
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            keeper = Keeper(settings, plan, folder / "inference.sock")
        except OSError as err:
            raise InferenceProcessError(f"it could not be started: {err}") from None
        finally:
            signal.signal(signal.SIGHUP, previous)
        try:
            yield plan.listening_at(folder / "inference.sock")
        finally:
            keeper.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
