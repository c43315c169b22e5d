"""Where each batch of a model runs, and why: one `ModelRuntime` per served model owns its sessions, the
choice between them, the fall-back and the model's lifetime (open, warm, close).

A model always opens on this worker's own sessions first (the CPU, or this worker's CUDA session when
there is no inference process), so nothing that happens to the inference process can leave a model out
or a worker empty. When the plan has an inference process, the worker's attacher (attach.py) hands the
runtime a `RemoteModel` once the process has the file open and warmed; the runtime then sends it the
batches the process is faster at, each with a deadline of a small multiple of what that batch size took
(at least DIGITGEN_GPU_DEADLINE_MIN_MS). A batch the process fails, misses the deadline of, or dies
during runs on the CPU session at once, the runtime detaches (`local: reconnecting`) and the attacher
brings the process back later: requests never wait for a reconnect. A model whose batches were in flight
each time the process died QUARANTINE_AFTER times within QUARANTINE_WINDOW_S stays on the CPU
(`local: quarantined`) until the next reload.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from service.manifest import ModelEntry
from service.providers import CPU
from service.runtime import devices
from service.runtime.session import LocalSession, ModelFileError, Session, open_model_session, zeros

log = logging.getLogger("digitgen.runtime")

DEADLINE_MULTIPLE = 8  # a batch gets this many times its size's measured time in the inference process
QUARANTINE_AFTER = 3
QUARANTINE_WINDOW_S = 600.0


class State(str, Enum):
    LOCAL = "local"  # no inference process planned: this worker's own sessions
    CONNECTING = "local: connecting"  # the process is planned and not attached yet
    REMOTE = "inference process"
    RECONNECTING = "local: reconnecting"  # the process failed a batch, missed its deadline or died
    QUARANTINED = "local: quarantined"  # the process died during this model's batches too often


@dataclass(frozen=True)
class Placement:
    """Where a model's batches run now and why: `cause` is a short code (a metric label), `detail` the text."""
    state: State
    cause: str
    detail: str
    provider: str  # what batches larger than cpu_up_to run on
    cpu_up_to: int = 0  # batches of at most this many images run on this worker's CPU session
    process_pid: int | None = None
    since: float = 0.0  # time.time()

    def describe(self) -> dict:
        return {"state": self.state.value, "cause": self.cause, "detail": self.detail, "provider": self.provider,
                "cpu_up_to_batch": self.cpu_up_to, "inference_process_pid": self.process_pid,
                "since": round(self.since, 3)}


class RemoteLost(Exception):
    """The inference process did not run a batch: gone, silent past the deadline, or it answered an error.
    `died`: the connection broke while the batch was in flight (the process may have died of it)."""

    def __init__(self, message: str, died: bool = False):
        super().__init__(message)
        self.died = died


class Remote(Session, Protocol):
    """A model's session in the inference process (service/inference/client.py)."""
    pid: int

    def run_within(self, z: np.ndarray, y: np.ndarray | None, deadline_s: float) -> np.ndarray: ...

    def gone(self) -> bool: ...


OnChange = Callable[["ModelRuntime", "Placement | None", "Placement | None"], None]  # old, new (None: closed)


class ModelRuntime:
    def __init__(self, entry: ModelEntry, path: Path, local: LocalSession, cpu: LocalSession | None,
                 expects_process: bool, deadline_min_s: float, deadline_max_s: float,
                 on_change: OnChange | None = None):
        self.entry, self.path = entry, path
        self.local = local  # this worker's main session: CUDA (per-worker) or the CPU
        self.cpu = cpu or local  # this worker's CPU session, for small batches
        self.deadline_min_s, self.deadline_max_s = deadline_min_s, deadline_max_s
        self._on_change = on_change
        self._lock = threading.Lock()
        self._remote: Remote | None = None
        self._deadlines: dict[int, float] = {}
        self._deaths: list[float] = []
        self._closed = False
        if expects_process:
            first = Placement(State.CONNECTING, "starting", "waiting for the inference process", CPU, since=time.time())
        else:
            first = Placement(State.LOCAL, "no-inference-process", f"runs in this worker on {local.provider}",
                              local.provider, since=time.time())
        self.placement = first
        self._report(None, first)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def key(self) -> str:
        """name@version: this version of the model (its queue, its logs)."""
        return self.entry.key

    @property
    def needs_attach(self) -> bool:
        state = self.placement.state
        return not self._closed and (state is State.CONNECTING or state is State.RECONNECTING)

    def run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """images [N, 1, H, W], finite and in [0, 1] whatever the inputs (an absurd latent can overflow a
        network to NaN); blocking: call it off the event loop."""
        images = self._run(z, y)
        if not np.isfinite(images).all():
            images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(images, 0.0, 1.0, out=images)

    def _run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        n = len(z)
        remote = self._remote
        if n <= self.placement.cpu_up_to:
            return self.cpu.run(z, y)
        if remote is None:
            return self.local.run(z, y)
        try:
            return remote.run_within(z, y, self._deadline(n))
        except RemoteLost as err:
            self.detach(remote, str(err), died=err.died)
        return self.cpu.run(z, y)

    def warm(self, sizes: tuple[int, ...]) -> None:
        """Run each batch size served once, so no request pays for first-run allocation, and (with a CUDA
        session of this worker's own) send the small batches to the CPU where it is faster. A file that
        loads but cannot run raises ModelFileError."""
        for n in sizes:
            out = self.local.run(*zeros(self.entry, n))
            if out.shape != (n, *self.entry.image_shape):
                raise ModelFileError(f"{self.name}: output shape {out.shape}, expected {(n, *self.entry.image_shape)}")
        if self.local is not self.cpu:
            up_to = devices.cpu_up_to(self._timer(self.cpu.run), self._timer(self.local.run),
                                      devices.batch_sizes(max(sizes)))
            with self._lock:
                self._place(State.LOCAL, self.placement.cause, self.placement.detail, self.local.provider, up_to)
            log.info("model %s: batches of at most %d image(s) on the CPU, larger ones on %s", self.name, up_to,
                     self.local.provider)

    def attach(self, remote: Remote, max_n: int) -> None:
        """From the attacher: time the process at each batch size (its deadlines), decide which sizes stay
        on the CPU, and send it the batches. The remote is closed instead when this model is no longer
        waiting for it (closed, quarantined, or attached meanwhile)."""
        sizes = devices.batch_sizes(max_n)
        try:
            run = partial(remote.run_within, deadline_s=self.deadline_max_s)
            remote_seconds = {n: devices.median_seconds(run, partial(zeros, self.entry), n) for n in sizes}
            up_to = 0 if remote.provider == CPU else devices.cpu_up_to(self._timer(self.cpu.run),
                                                                       remote_seconds.__getitem__, sizes)
        except RemoteLost as err:
            remote.close()
            self.detach(None, f"timing the inference process failed: {err}", died=err.died)
            return
        with self._lock:
            if not self.needs_attach:
                remote.close()
                return
            self._remote, self._deadlines = remote, remote_seconds
            self._place(State.REMOTE, "attached", f"on {remote.provider} in the inference process {remote.pid}",
                        remote.provider, up_to, remote.pid)
        log.info("model %s: runs in the inference process %d on %s (batches of at most %d image(s) on this "
                 "worker's CPU)", self.name, remote.pid, remote.provider, up_to)

    def check_remote(self) -> None:
        """From the attacher: detach from a process that went away while this model had no batch, so its
        state says so before the next request finds out."""
        remote = self._remote
        if remote is not None and remote.gone():
            self.detach(remote, f"the inference process {remote.pid} went away")

    def detach(self, remote: Remote | None, reason: str, died: bool = False) -> None:
        """Stop sending batches to `remote` (None: the attach failed): reconnecting, or quarantined after
        QUARANTINE_AFTER deaths in QUARANTINE_WINDOW_S."""
        with self._lock:
            if remote is not None and self._remote is not remote:
                return  # another batch detached it already
            self._remote = None
            if died:
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < QUARANTINE_WINDOW_S] + [now]
            if self._closed:
                pass
            elif len(self._deaths) >= QUARANTINE_AFTER:
                self._place(State.QUARANTINED, "crashes", f"the inference process died {len(self._deaths)} times "
                            f"during its batches; stays on this worker's CPU until a reload: {reason}", CPU)
                log.error("model %s quarantined on the CPU: %s", self.name, self.placement.detail)
            elif remote is None:  # an attach that failed: still waiting, with the reason
                state = self.placement.state
                self._place(state, "unreachable", reason, CPU)
                log.debug("model %s: %s", self.name, reason)
            else:
                self._place(State.RECONNECTING, "died" if died else "unreachable", reason, CPU)
                log.warning("model %s: %s; its batches run on this worker's CPU meanwhile", self.name, reason)
        if remote is not None:
            remote.close()

    def close(self) -> None:
        """Let go of what is held outside this process: the inference process's session of this file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            remote, self._remote = self._remote, None
            self._report(self.placement, None)
        if remote is not None:
            remote.close()

    def _deadline(self, n: int) -> float:
        measured = next((t for size, t in sorted(self._deadlines.items()) if size >= n),
                        max(self._deadlines.values(), default=0.0))
        return min(self.deadline_max_s, max(self.deadline_min_s, DEADLINE_MULTIPLE * measured))

    def _timer(self, run: Callable) -> Callable[[int], float]:
        return lambda n: devices.median_seconds(run, partial(zeros, self.entry), n)

    def _place(self, state: State, cause: str, detail: str, provider: str, cpu_up_to: int = 0,
               pid: int | None = None) -> None:
        """Replace the placement whole (under the lock, or from __init__) and report the change."""
        old = self.placement
        self.placement = Placement(state, cause, detail, provider, cpu_up_to, pid, time.time())
        self._report(old, self.placement)

    def _report(self, old: Placement | None, new: Placement | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self, old, new)
        except Exception as err:
            log.warning("model %s: reporting its placement failed: %r", self.name, err)


def open_model(entry: ModelEntry, models_dir: Path, providers: list, threads: int, expects_process: bool,
               deadline_min_s: float, deadline_max_s: float, on_change: OnChange | None = None,
               path: Path | None = None) -> ModelRuntime:
    """The entry's runtime on this worker's own sessions, after the file's checks; ModelFileError (never
    another error) when any fails. `path`: where to read the file instead of the models folder (the
    supervisor's checked copy, service/lifecycle.py). On CUDA, a CPU session of the same file too, for small batches."""
    path = path or models_dir / entry.file
    local = open_model_session(path, entry, providers, threads)
    cpu = open_model_session(path, entry, [CPU], threads) if local.provider != CPU else None
    log.info("model %s loaded from %s on %s", entry.name, path, local.provider)
    return ModelRuntime(entry, path, local, cpu, expects_process, deadline_min_s, deadline_max_s, on_change)
