"""The inference process: one session per model file, shared by every worker that opened it, each served by
the runtime's Batcher, so the batches of all workers that wait together run as one call.

Threads are bounded, whatever the number of workers: one I/O thread reads every connection (selectors),
CONTROL_THREADS open and warm files, and one batch thread runs each session. A session is opened and
warmed at every batch size up to the largest it will merge (cuDNN's choice and the arena's growth happen
here, not on a request), and stays pinned while any worker holds a link to it. Batches merge up to that
largest warmed size. The keeper's PING is answered by the I/O thread with how long the oldest batch has
been running, so a process stuck in a device call is seen as hung even though it answers.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from service import logs
from service.config import Settings
from service.inference import wire
from service.orphans import die_with_parent
from service.plan import Plan
from service.runtime.batcher import Batcher, Job
from service.runtime.session import LocalSession, ModelFileError, open_onnx

log = logging.getLogger("digitgen.inference")

CONTROL_THREADS = 2
MAX_QUEUED = 4096  # batches waiting per session: every worker's in-flight batches, many times over
CLOSE_TIMEOUT_S = 5.0

OpenSession = Callable[[Path, str, int, int], LocalSession]  # (path, sha256, latent_dim, num_classes)


class Connection:
    """One worker's link to one model, in the process."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = wire.Reader()
        self.buffer: np.ndarray | None = None
        self.pinned: Pinned | None = None
        self.closed = False
        self._sending = threading.Lock()

    def answer(self, kind: int, payload: dict) -> None:
        with self._sending:
            if self.closed:
                return
            try:
                wire.send(self.sock, kind, payload)
            except OSError:  # the worker gave up on it (its deadline) or died: nothing to answer
                self.closed = True

    def is_closed(self) -> bool:
        return self.closed


@dataclass(eq=False)
class Pinned:
    """A file's session and batcher, with the connections that hold it."""
    key: str
    opened: threading.Event = field(default_factory=threading.Event)
    session: LocalSession | None = None
    batcher: Batcher | None = None
    error: str | None = None
    users: int = 0


class InferenceServer:
    def __init__(self, open_session: OpenSession, max_batch: int):
        self.open_session, self.max_batch = open_session, max_batch
        self.sessions: dict[str, Pinned] = {}
        self._lock = threading.Lock()
        self._control = ThreadPoolExecutor(CONTROL_THREADS, thread_name_prefix="open")
        self._selector = selectors.DefaultSelector()

    def busy_for(self) -> float:
        """How long the oldest batch running has run: a device call that never returns shows here."""
        with self._lock:
            batchers = [p.batcher for p in self.sessions.values() if p.batcher is not None]
        return max((b.busy_for() for b in batchers), default=0.0)

    def serve(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    self._accept(listener)
                else:
                    self._readable(key.data)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as err:  # out of descriptors, say: the workers retry; the process must not exit
            log.error("accepting a connection failed: %s", err)
            time.sleep(0.05)
            return
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, Connection(sock))

    def _readable(self, conn: Connection) -> None:
        try:
            if not conn.reader.read(conn.sock):
                self._drop(conn)
                return
            for kind, payload in conn.reader.messages():
                self._handle(conn, kind, payload)
        except BlockingIOError:
            pass
        except Exception as err:  # a broken or hostile message ends that connection, never the process
            log.warning("dropping a connection: %r", err)
            self._drop(conn)

    def _handle(self, conn: Connection, kind: int, payload: dict) -> None:
        if kind == wire.PING:
            conn.answer(wire.OK, {"pid": os.getpid(), "busy_s": self.busy_for(), "sessions": len(self.sessions)})
        elif kind == wire.OPEN:
            self._control.submit(self._open, conn, payload)
        elif kind == wire.MAP:
            if not conn.reader.fds:
                raise wire.ProtocolError("MAP without a descriptor")
            conn.buffer = _map(conn.reader.fds.pop(0))
            conn.answer(wire.OK, {})
        elif kind == wire.RUN:
            self._run(conn, payload)
        else:
            raise wire.ProtocolError(f"unknown message kind {kind}")

    def _run(self, conn: Connection, payload: dict) -> None:
        pinned, buffer = conn.pinned, conn.buffer
        n, z_width, y_width = int(payload["n"]), int(payload["z"]), int(payload["y"])
        if pinned is None or pinned.batcher is None or buffer is None or n * (z_width + y_width) > buffer.size:
            conn.answer(wire.ERROR, {"message": f"a batch of {n} without an open model or a buffer that fits it"})
            return
        deadline = time.monotonic() + float(payload["deadline"])
        job = Job(n, (conn, buffer, z_width, y_width), deadline, conn.is_closed)
        try:
            pinned.batcher.submit(job)
        except Exception as err:  # QueueFull, or the session is closing
            conn.answer(wire.ERROR, {"message": str(err)})

    def _open(self, conn: Connection, request: dict) -> None:
        """On a control thread: the file's pinned session (opened and warmed by its first user), then the
        answer to the worker."""
        key = f"{request['sha256']}:{request['path']}"
        try:
            with self._lock:
                pinned = self.sessions.get(key)
                first = pinned is None
                if pinned is None:
                    pinned = self.sessions[key] = Pinned(key)
                pinned.users += 1  # held from here: released below on failure, or when the connection closes
            if first:
                self._open_pinned(pinned, request)
            pinned.opened.wait()
            if pinned.error is not None:
                self._release(pinned)
                conn.answer(wire.ERROR, {"message": f"the inference process cannot open it: {pinned.error}"})
                return
            conn.pinned = pinned
            if conn.closed:  # gone while its open was pending
                self._release_of(conn)
                return
            assert pinned.session is not None
            conn.answer(wire.OK, {"provider": pinned.session.provider, "pid": os.getpid()})
        except Exception as err:
            log.exception("opening %s failed", request.get("path"))
            conn.answer(wire.ERROR, {"message": f"the inference process failed to open it: {err!r}"})

    def _open_pinned(self, pinned: Pinned, request: dict) -> None:
        path = Path(request["path"])
        try:
            latent, classes = int(request["latent_dim"]), int(request["num_classes"])
            session = self.open_session(path, request["sha256"], latent, classes)
            started = time.perf_counter()
            for n in sorted(set(request.get("sizes", [])) | {self.max_batch}):
                z = np.zeros((n, latent), np.float32)
                session.run(z, np.full((n, classes), 1 / classes, np.float32) if classes else None)
            pinned.session = session
            pinned.batcher = Batcher(path.name, stacked_run(session), _write_rows, _answer, max_batch=self.max_batch,
                                     max_queued=MAX_QUEUED)
            log.info("opened %s on %s, warmed up to batch %d in %.0f ms", path.name, session.provider,
                     self.max_batch, 1000 * (time.perf_counter() - started))
        except ModelFileError as err:
            pinned.error = str(err)
        except Exception as err:  # a file that loads but cannot run
            pinned.error = f"warm-up failed: {str(err).strip()[:300]}"
        finally:
            if pinned.error is not None:
                with self._lock:
                    self.sessions.pop(pinned.key, None)
            pinned.opened.set()

    def _drop(self, conn: Connection) -> None:
        with conn._sending:
            conn.closed = True
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for fd in conn.reader.fds:
            os.close(fd)
        self._release_of(conn)

    def _release_of(self, conn: Connection) -> None:
        pinned, conn.pinned = conn.pinned, None
        if pinned is not None:
            self._release(pinned)

    def _release(self, pinned: Pinned) -> None:
        with self._lock:
            pinned.users -= 1
            last = pinned.users == 0 and self.sessions.get(pinned.key) is pinned
            if last:
                del self.sessions[pinned.key]
        if last and pinned.batcher is not None:
            self._control.submit(pinned.batcher.close, CLOSE_TIMEOUT_S)
            log.info("closed %s: no worker holds it", pinned.key.split(":", 1)[1])


def stacked_run(session: LocalSession) -> Callable[[list[Job]], np.ndarray]:
    """The batcher's run: every job's inputs, read from its worker's buffer, stacked into one call."""
    def run(jobs: list[Job]) -> np.ndarray:
        zs, ys = [], []
        for job in jobs:
            _, buffer, z_width, y_width = job.payload
            n = job.size
            zs.append(buffer[:n * z_width].reshape(n, z_width))
            if y_width:
                ys.append(buffer[n * z_width:n * (z_width + y_width)].reshape(n, y_width))
        z = np.concatenate(zs) if len(zs) > 1 else zs[0].copy()
        y = (np.concatenate(ys) if len(ys) > 1 else ys[0].copy()) if ys else None
        return session.run(z, y)
    return run


def _write_rows(job: Job, rows: np.ndarray) -> list[int]:
    """This job's images into its worker's buffer, after its inputs; their shape is the answer."""
    _, buffer, z_width, y_width = job.payload
    start = job.size * (z_width + y_width)
    if start + rows.size > buffer.size:
        raise ValueError(f"the output of a batch of {job.size} {rows.shape} does not fit the mapped buffer")
    buffer[start:start + rows.size] = rows.reshape(-1)
    return list(rows.shape)


def _answer(jobs: list[Job], results: list) -> None:
    for job, result in zip(jobs, results):
        conn = job.payload[0]
        if isinstance(result, Exception):
            conn.answer(wire.ERROR, {"message": str(result)[:500]})
        else:
            conn.answer(wire.OK, {"shape": result})


def _map(fd: int) -> np.ndarray:
    try:
        return np.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), np.float32)
    finally:
        os.close(fd)


def raise_open_files_limit() -> None:
    """A socket per model, worker and batch in flight: 16 workers x 5 models x 5 links is 400; on a larger
    machine that passes a container's usual soft limit of 1,024, so take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("open files limit stays at %d: %s", soft, err)


def main(settings: Settings, plan: Plan, address: str, ready, parent: int) -> None:
    """The inference process: open sessions on the planned device as the workers ask, run their batches.
    SIGHUP is ignored (a reload reaches it as the workers' opening of new files); Ctrl-C reaches the whole
    group, and the supervisor stops this process itself."""
    die_with_parent(parent)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(settings.log_level, settings.log_format, "inference")
    raise_open_files_limit()
    providers = list(plan.device_providers)

    def open_session(path: Path, sha256: str, latent_dim: int, num_classes: int) -> LocalSession:
        # one thread: on CUDA the device does the work, on the CPU the workers' own sessions need the cores
        return LocalSession(open_onnx(path, sha256, providers, 1))
    server = InferenceServer(open_session, max(settings.max_n, settings.batch_max_size))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1024)
    log.info("inference process listening (%s)", providers[0] if isinstance(providers[0], str) else providers[0][0])
    ready.set()
    server.serve(listener)
