"""One model file opened for serving: an ONNX Runtime session per manifest entry that passes its checks.

Each file's sha256 is verified against the manifest (written by the same pydantic model the export
uses), the session opened on the chosen providers and its interface checked. Any failure is a
ModelFileError naming the file and the reason, so the caller leaves that model out and serves the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service import devices
from service.config import Settings
from service.gpu_process import GpuProcessUnreachable
from service.manifest import ModelEntry, sha256_of
from service.providers import CPU

log = logging.getLogger("digitgen.registry")


class ModelFileError(Exception):
    """A model left out (at start-up or reload); the message says why."""


@dataclass
class LoadedModel:
    entry: ModelEntry
    session: ort.InferenceSession
    provider: str
    cpu_session: ort.InferenceSession | None = None  # on CUDA: the same file on the CPU, for small batches
    cpu_up_to: int = 0  # batches of at most this many images run on cpu_session (measured at warm-up)
    on_cpu_meanwhile: bool = False  # the GPU inference process is unreachable: every batch on cpu_session

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def gpu_process_pid(self) -> int | None:
        """The inference process that runs this model's large batches (service/gpu_process.py), if one does."""
        return getattr(self.session, "server_pid", None)

    def run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """images [N, 1, 28, 28] in [0, 1] for z [N, latent] (and y [N, classes]); blocking: call it off the loop.
        While the GPU inference process is unreachable (gone, restarting, silent), batches run on the CPU."""
        if len(z) <= self.cpu_up_to:
            return _run(self.cpu_session, z, y)
        try:
            output = _run(self.session, z, y)
        except GpuProcessUnreachable as err:
            if not self.on_cpu_meanwhile:
                log.warning("model %s: %s; its batches run on the CPU until it is back", self.name, err)
            self.on_cpu_meanwhile = True
            return _run(self.cpu_session, z, y)
        if self.on_cpu_meanwhile:
            log.info("model %s: the GPU inference process is back", self.name)
            self.on_cpu_meanwhile = False
        return output

    def close(self) -> None:
        """Let go of what is held outside this process: the inference process's session of this file."""
        if hasattr(self.session, "close"):
            self.session.close()

    def warm(self, batch_sizes: tuple[int, ...]) -> None:
        """Run every batch size we will serve once, so no request pays for first-run allocation; a file that
        loads but cannot run raises here."""
        for n in batch_sizes:
            out = self.run(*self.zeros(n))
            if out.shape != (n, *self.entry.image_shape):
                raise ModelFileError(f"{self.name}: output shape {out.shape}, expected {(n, *self.entry.image_shape)}")
        if self.cpu_session is not None:
            self.choose_devices(max(batch_sizes))

    def choose_devices(self, max_n: int) -> None:
        """Time the CPU session against the main (CUDA) one at each batch size served, and send the small
        batches to the CPU where it is faster (service/devices.py)."""
        def timer(session):
            return lambda n: devices.median_seconds(partial(_run, session), self.zeros, n)
        self.cpu_up_to = devices.cpu_up_to(timer(self.cpu_session), timer(self.session), devices.batch_sizes(max_n))
        log.info("model %s: batches of at most %d image(s) on the CPU, larger ones on %s", self.name,
                 self.cpu_up_to, self.provider)

    def zeros(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A batch of n inputs: z = 0 and, for a conditional model, y the uniform blend of the classes."""
        z = np.zeros((n, self.entry.latent_dim), np.float32)
        y = np.full((n, self.entry.num_classes), 1 / max(self.entry.num_classes, 1), np.float32) \
            if self.entry.conditional else None
        return z, y


def _run(session: ort.InferenceSession, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    return session.run(["image"], {"z": z} if y is None else {"z": z, "y": y})[0]


def _check_interface(session: ort.InferenceSession, entry: ModelEntry) -> None:
    """The ONNX interface of issue 3: z [N, latent_dim], y [N, num_classes] when conditional, image out."""
    inputs = {i.name: i for i in session.get_inputs()}
    expected = {"z": entry.latent_dim} | ({"y": entry.num_classes} if entry.conditional else {})
    if set(inputs) != set(expected):
        raise ModelFileError(f"inputs are {sorted(inputs)}, the manifest implies {sorted(expected)}")
    for name, width in expected.items():
        if inputs[name].type != "tensor(float)" or inputs[name].shape[1:] != [width]:
            raise ModelFileError(f"input {name} is {inputs[name].type} {inputs[name].shape}, expected float [N, {width}]")
    if [o.name for o in session.get_outputs()] != ["image"]:
        raise ModelFileError(f"outputs are {[o.name for o in session.get_outputs()]}, expected ['image']")


def open_session(path: Path, sha256: str, providers: list, settings: Settings) -> ort.InferenceSession:
    """A session of the file the manifest names (a model's or a judge's), after its checksum; ModelFileError
    (never another error) when it is missing, unreadable, another file or not loadable."""
    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    try:
        actual = sha256_of(path)
    except OSError as err:  # unreadable (permissions, I/O error): this model is left out, not the service
        raise ModelFileError(f"{path} cannot be read: {err.strerror or err}") from None
    if actual != sha256:
        raise ModelFileError(f"{path} has sha256 {actual[:12]}..., the manifest says {sha256[:12]}...")
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # ONNX Runtime's own warnings would repeat what we log
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # ONNX Runtime raises its own types for corrupt files
        raise ModelFileError(f"{path} does not load in ONNX Runtime: {str(err).strip()[:200]}") from None
    if providers[0] != CPU and session.get_providers()[0] == CPU:
        log.warning("%s: CUDA was requested but ONNX Runtime fell back to the CPU "
                    "(CUDA or cuDNN libraries missing?)", path.name)
    return session


def open_model(entry: ModelEntry, models_dir: Path, providers: list, settings: Settings) -> LoadedModel:
    """The entry's session, after its checks; ModelFileError (never another error) when any fails. With an
    inference process (settings.gpu_process), the session opened here is the CPU one for small batches
    and the main one is the process's (service/gpu_process.py)."""
    path = models_dir / entry.file
    session = open_session(path, entry.sha256, providers, settings)
    _check_interface(session, entry)
    if settings.gpu_process is not None:
        return _with_gpu_process(entry, path, session, settings.gpu_process, settings.request_timeout_s)
    provider = session.get_providers()[0]
    log.info("model %s loaded from %s on %s", entry.name, path, provider)
    cpu = open_session(path, entry.sha256, [CPU], settings) if provider != CPU else None
    return LoadedModel(entry, session, provider, cpu)


def _with_gpu_process(entry: ModelEntry, path: Path, cpu: ort.InferenceSession, address: Path,
                      timeout_s: float) -> LoadedModel:
    from service.gpu_process import GpuProcessError, RemoteSession
    try:
        remote = RemoteSession(address, path.resolve(), entry.sha256, int(np.prod(entry.image_shape)), timeout_s)
    except GpuProcessError as err:
        raise ModelFileError(str(err)) from None
    log.info("model %s loaded from %s on %s in the inference process %d", entry.name, path, remote.provider,
             remote.server_pid)
    return LoadedModel(entry, remote, remote.provider, cpu)
