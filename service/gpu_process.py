"""One inference process holds the GPU sessions of every worker (DIGITGEN_GPU_SESSIONS=shared).

With CUDA sessions in each worker, every worker pays for a CUDA context, cuBLAS and cuDNN whatever its
arena cap: 16 workers held 32 GB of an H200, against 2.4 to 4.3 GB for this one process
(tests/benchmarks/results/gpu_serve.json). The workers keep the HTTP, sampling and encoding work and their
CPU sessions for small batches (service/devices.py), as Triton and LitServe separate front ends from model
instances.

A worker's model (a RemoteSession) talks to the process over a Unix socket in a private folder, a
connection per model and thread that runs it. The tensors travel through a memfd that both map: the
worker writes z and y into it, sends three integers, and the process writes the images beside them. The
descriptor itself crosses the socket (SCM_RIGHTS), so no file names the buffer. In the process, a Runner
per model runs whatever batches arrived while it was busy as one call.

The supervisor's side is `serving(settings)`: it starts the process before the workers and starts another
when it dies; the process dies with the supervisor. While the process is gone, restarting or silent
(DIGITGEN_REQUEST_TIMEOUT_S), a worker runs its batches on its own CPU sessions (service/registry.py);
a RemoteSession connects anew, maps its buffer and opens its model again on its next batch.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path

import numpy as np

log = logging.getLogger("digitgen.gpu_process")

FLOAT32 = 4
START_TIMEOUT_S = 120.0  # loading CUDA and cuDNN takes seconds; a process not listening by then has failed
RESTART_DELAY_S = 1.0


class GpuProcessError(Exception):
    """The inference process could not start, open a model or run a batch; the message says why."""


class GpuProcessUnreachable(GpuProcessError):
    """The inference process is gone, not yet back, or did not answer in time: the worker runs the batch on
    its own CPU session instead (service/registry.py)."""


class RemoteSession:
    """A model run by the inference process, with the part of ONNX Runtime's session API the service uses
    (`run`, `get_providers`). Each thread that runs it has its own connection and buffer, so a worker can
    have several batches of a model in flight (service/batching.py)."""

    def __init__(self, address: Path, path: Path, sha256: str, image_values: int, timeout_s: float):
        self.address, self.path, self.sha256 = address, path, sha256
        self.image_values, self.timeout_s = image_values, timeout_s
        self._local = threading.local()
        self._links: list[Link] = []  # the threads' links, closed with the session
        opening = Link(address, path, sha256, image_values, timeout_s)  # checks the process can open the file
        self.provider, self.server_pid = opening.opened
        opening.close()
        weakref.finalize(self, _close_all, self._links)

    def get_providers(self) -> list[str]:
        return [self.provider]

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """[images] for feeds {"z": [N, latent], "y": [N, classes]}. GpuProcessError when the process fails
        the batch; GpuProcessUnreachable when it is gone or silent. A batch the process was running when it
        died is not sent again (it may be what killed it); the thread's next batch connects anew."""
        link = getattr(self._local, "link", None)
        try:
            if link is None:
                link = self._local.link = Link(self.address, self.path, self.sha256, self.image_values, self.timeout_s)
                self._links.append(link)
                self.server_pid = link.opened[1]
            return [link.run(feeds)]
        except GpuProcessUnreachable:
            self._drop(link)
            raise
        except (EOFError, OSError) as err:  # it died (the supervisor starts another)
            self._drop(link)
            raise GpuProcessUnreachable(f"the GPU inference process went away: {err or type(err).__name__}") from None

    def close(self) -> None:
        """Close every thread's link: the process drops the model's session once no worker uses it."""
        _close_all(self._links)

    def _drop(self, link: Link | None) -> None:
        self._local.link = None
        if link is not None:
            link.close()
            if link in self._links:
                self._links.remove(link)


class Link:
    """One connection to the inference process with its shared buffer; used by one thread at a time."""

    def __init__(self, address: Path, path: Path, sha256: str, image_values: int, timeout_s: float):
        self.image_values, self.timeout_s = image_values, timeout_s
        self.conn: Connection | None = None
        self.buffer: np.ndarray | None = None
        try:
            self.conn = Client(str(address), family="AF_UNIX")
            self._wait_at_most(START_TIMEOUT_S)  # opening a file on CUDA takes seconds
            self.conn.send(("open", str(path), sha256))
            answer = self._answer(START_TIMEOUT_S)
            self._wait_at_most(timeout_s)
        except GpuProcessUnreachable:
            self.close()
            raise
        except (EOFError, OSError) as err:
            self.close()
            raise GpuProcessUnreachable(f"the GPU inference process at {address} is unreachable: "
                                        f"{err or type(err).__name__}") from None
        if answer[0] != "ok":
            self.close()
            raise GpuProcessError(answer[1])
        self.opened = (answer[1], answer[2])  # the provider it runs on there, and the process's pid

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        z, y = feeds["z"], feeds.get("y")
        n, z_width, y_width = len(z), z.shape[1], 0 if y is None else y.shape[1]
        self._fit(n * (z_width + y_width + self.image_values))
        np.copyto(self.buffer[:n * z_width].reshape(n, z_width), z, casting="same_kind")
        if y is not None:
            np.copyto(self.buffer[n * z_width:n * (z_width + y_width)].reshape(n, y_width), y, casting="same_kind")
        self.conn.send(("run", n, z_width, y_width))
        answer = self._answer(self.timeout_s)
        if answer[0] != "ok":
            raise GpuProcessError(answer[1])
        start = n * (z_width + y_width)
        return self.buffer[start:start + int(np.prod(answer[1]))].reshape(answer[1]).copy()

    def _wait_at_most(self, seconds: float) -> None:
        """A receive timeout on the socket itself (SO_RCVTIMEO): no extra call per batch, as a poll before
        each receive would be (each one a chance to lose the GIL to a busy event loop)."""
        with socket.socket(fileno=os.dup(self.conn.fileno())) as view:  # the same socket, another descriptor
            view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))

    def _answer(self, timeout_s: float) -> tuple:
        """The process's answer; GpuProcessUnreachable when none comes in time (the link must then be
        dropped: a late answer would be taken for the next one's)."""
        try:
            return self.conn.recv()
        except BlockingIOError:  # the receive timeout
            raise GpuProcessUnreachable(f"the GPU inference process did not answer within {timeout_s:g} s") from None

    def _fit(self, values: int) -> None:
        """A shared buffer of at least `values` floats: when it is too small, a new memfd of the next power of
        two bytes (at least 64 KiB), handed to the process."""
        if self.buffer is not None and self.buffer.size >= values:
            return
        size = max(1 << 16, 1 << (values * FLOAT32 - 1).bit_length())
        fd = os.memfd_create("digitgen-batch")
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
            self.conn.send(("map",))
            send_handle(self.conn, fd, os.getpid())  # the pid is not used on Linux
        finally:
            os.close(fd)
        if self._answer(self.timeout_s)[0] != "ok":
            raise GpuProcessError("the GPU process could not map the batch buffer")
        self.buffer = np.frombuffer(memory, np.float32)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self.buffer = None, None


def _close_all(links: list[Link]) -> None:
    for link in list(links):
        link.close()
    links.clear()


class Runner:
    """One model's session in the process and the thread that runs it: the batches every worker sent while
    it was busy run as one call, so sixteen workers' small batches cost the GPU one launch, not sixteen."""

    def __init__(self, session):
        self.session = session
        self._pending: list[list] = []  # [feeds, result or exception, done Event]
        self._wake = threading.Condition()
        self._closed = False
        threading.Thread(target=self._serve, daemon=True, name="gpu-runner").start()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """This batch's images, from a call shared with whatever else was waiting (raises what the model raised)."""
        job = [feeds, None, threading.Event()]
        with self._wake:
            self._pending.append(job)
            self._wake.notify()
        job[2].wait()
        if isinstance(job[1], Exception):
            raise job[1]
        return job[1]

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                jobs, self._pending = self._pending, []
            try:
                images = self.session.run(["image"], _stacked([job[0] for job in jobs]))[0]
                start = 0
                for job in jobs:
                    job[1] = images[start:start + len(job[0]["z"])]
                    start += len(job[0]["z"])
            except Exception as err:  # ONNX Runtime raises its own types: each worker gets the reason
                for job in jobs:
                    job[1] = err
            for job in jobs:
                job[2].set()


def _stacked(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


class InferenceServer:
    """The process's side: a thread per connection (one model of one worker), a Runner per file (by sha256)
    shared by every connection that opened it, closed when the last of them closes."""

    def __init__(self, open_session):
        self.open_session = open_session  # (path, sha256) -> an ONNX Runtime session; raises ModelFileError
        self.runners: dict[str, Runner] = {}
        self.users: dict[str, int] = {}
        self.lock = threading.Lock()

    def serve(self, listener: Listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError as err:  # out of descriptors, say: the workers retry; the process must not exit
                log.error("accepting a connection failed: %s", err)
                time.sleep(0.1)
                continue
            threading.Thread(target=self.handle, args=(conn,), daemon=True, name="gpu-conn").start()

    def handle(self, conn: Connection) -> None:
        key, buffer = None, None
        try:
            _, path, sha256 = conn.recv()  # ("open", path, sha256)
            runner, answer = self.acquire(path, sha256)
            key = sha256 if runner is not None else None  # released below even if the worker is gone already
            conn.send(answer)
            if runner is None:
                return
            while True:
                message = conn.recv()
                if message[0] == "map":
                    buffer = _map(recv_handle(conn))
                    conn.send(("ok",))
                else:  # ("run", n, z_width, y_width)
                    conn.send(_run(runner, buffer, *message[1:]))
        except (EOFError, OSError):  # the worker closed the model, or died
            pass
        finally:
            conn.close()
            if key is not None:
                self.release(key)

    def acquire(self, path: str, sha256: str):
        """The file's runner (its session opened by the first user) and the answer for the worker."""
        from service.registry import ModelFileError
        with self.lock:
            if sha256 not in self.runners:
                try:
                    self.runners[sha256] = Runner(self.open_session(Path(path), sha256))
                except ModelFileError as err:
                    return None, ("error", f"the GPU process cannot open it: {err}")
                log.info("opened %s on %s", Path(path).name, self.runners[sha256].session.get_providers()[0])
            self.users[sha256] = self.users.get(sha256, 0) + 1
            return self.runners[sha256], ("ok", self.runners[sha256].session.get_providers()[0], os.getpid())

    def release(self, sha256: str) -> None:
        with self.lock:
            self.users[sha256] -= 1
            if not self.users[sha256]:
                del self.users[sha256]
                self.runners.pop(sha256).close()


def _map(fd: int) -> np.ndarray:
    try:
        return np.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), np.float32)
    finally:
        os.close(fd)


def _run(runner: Runner, buffer: np.ndarray | None, n: int, z_width: int, y_width: int) -> tuple:
    """Run the batch the worker wrote into the buffer; write the images after it. The answer to send."""
    inputs = n * (z_width + y_width)
    if buffer is None or inputs > buffer.size:
        return "error", f"a batch of {n} does not fit the mapped buffer"
    feeds = {"z": buffer[:n * z_width].reshape(n, z_width)}
    if y_width:
        feeds["y"] = buffer[n * z_width:inputs].reshape(n, y_width)
    try:
        images = runner.run(feeds)
    except Exception as err:
        return "error", f"the GPU process failed the batch of {n}: {str(err).strip()[:300]}"
    if inputs + images.size > buffer.size:
        return "error", f"the output of a batch of {n} ({images.shape}) does not fit the mapped buffer"
    buffer[inputs:inputs + images.size] = images.reshape(-1)
    return "ok", images.shape


def main(settings, address: str, ready) -> None:
    """The inference process: open sessions on the planned providers as the workers ask, run their batches.
    SIGHUP is ignored: a reload reaches it as the workers' opening of the new files."""
    from service.providers import session_providers
    from service.registry import open_session

    _die_with_parent()
    _raise_open_files_limit()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor stops us
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    providers = session_providers(settings)  # settings.gpu_process is unset here: CUDA with the planned arena cap
    gpu_settings = settings.model_copy(update={"intra_op_threads": 1})  # the CPU fallback must not take the cores
    server = InferenceServer(lambda path, sha256: open_session(path, sha256, providers, gpu_settings))
    listener = Listener(address, family="AF_UNIX", backlog=1024)
    log.info("GPU inference process %d listening (%s)", os.getpid(), providers[0] if isinstance(providers[0], str)
             else providers[0][0])
    ready.set()
    server.serve(listener)


def _die_with_parent() -> None:
    """SIGTERM this process when the supervisor's thread that started it ends (the supervisor killed,
    say): nobody else would stop it, and it holds GPU memory (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the supervisor: a killed supervisor leaves this process running")


def _raise_open_files_limit() -> None:
    """A socket per model, worker and batch thread: 16 workers x 5 models x 5 links is 400; on a larger
    machine that passes a container's usual soft limit of 1,024, so take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("open files limit stays at %d: %s", soft, err)


class Keeper:
    """Starts the inference process and starts another whenever it dies, until stopped."""

    def __init__(self, settings, address: Path):
        self.settings, self.address = settings, address
        self.context = multiprocessing.get_context("spawn")
        self.stopping = threading.Event()
        self.process = self.start()
        self.thread = threading.Thread(target=self.watch, daemon=True, name="gpu-keeper")
        self.thread.start()

    def start(self):
        """A running, listening process; GpuProcessError when it exits or hangs first."""
        self.address.unlink(missing_ok=True)  # a dead process's socket
        ready = self.context.Event()
        process = self.context.Process(target=main, args=(self.settings, str(self.address), ready),
                                       name="digitgen-gpu", daemon=True)
        process.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.1):
            if not process.is_alive() or time.monotonic() > deadline or self.stopping.is_set():
                process.kill()
                process.join()
                raise GpuProcessError(f"the GPU inference process did not start (status {process.exitcode})")
        return process

    def watch(self) -> None:
        while not self.stopping.is_set():
            self.process.join(0.5)
            if self.process.is_alive() or self.stopping.is_set():
                continue
            log.warning("GPU inference process %s exited (status %s); starting another",
                        self.process.pid, self.process.exitcode)
            try:
                self.process = self.start()
            except GpuProcessError as err:
                if self.stopping.is_set():
                    return
                log.error("%s; retrying in %.0f s", err, RESTART_DELAY_S)
                self.stopping.wait(RESTART_DELAY_S)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.process.terminate()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@contextmanager
def serving(settings):
    """The settings the workers get: with the inference process running and its address in them, when the
    plan shares the GPU sessions (service/providers.py); unchanged otherwise."""
    from service.providers import shares_gpu
    if not shares_gpu(settings):
        yield settings
        return
    try:
        folder = Path(tempfile.mkdtemp(prefix="digitgen-gpu-"))  # 0700: only this user reaches the socket
    except OSError as err:
        raise GpuProcessError(f"no folder for its socket: {err}") from None
    try:
        # A SIGHUP while CUDA starts would end the supervisor (its handler comes with the workers): nothing
        # to reload yet, the workers read the manifest as it is when they start.
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            keeper = Keeper(settings, folder / "inference.sock")
        except OSError as err:
            raise GpuProcessError(f"it could not be started: {err}") from None
        finally:
            signal.signal(signal.SIGHUP, previous)
        try:
            yield settings.model_copy(update={"gpu_process": folder / "inference.sock"})
        finally:
            keeper.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
