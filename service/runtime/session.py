"""A model file opened for serving: its checksum, its ONNX Runtime session and its interface, checked.

`Session` names what the runtime needs of a session, so an ONNX Runtime session in this process
(`LocalSession`) and one in the inference process (service/inference/client.py: `RemoteModel`) stand in
for each other without probing. Any failure to open is a ModelFileError naming the file and the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.manifest import ModelEntry, sha256_of
from service.providers import CPU

log = logging.getLogger("digitgen.session")


class ModelFileError(Exception):
    """A model (or judge) file that cannot be served; the message says why."""


class Session(Protocol):
    provider: str

    def run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """images [N, 1, H, W] in [0, 1] for z [N, latent] (and y [N, classes]); blocking."""
        ...

    def close(self) -> None:
        ...


class LocalSession:
    """An ONNX Runtime session of a model file, in this process."""

    def __init__(self, session: ort.InferenceSession):
        self.ort = session
        self.provider = session.get_providers()[0]

    def run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        return self.ort.run(["image"], {"z": z} if y is None else {"z": z, "y": y})[0]

    def close(self) -> None:
        """Nothing outside this process to let go of: ONNX Runtime frees the session with the object."""


def open_onnx(path: Path, sha256: str, providers: list, threads: int) -> ort.InferenceSession:
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
    options.intra_op_num_threads = threads
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


def check_interface(session: ort.InferenceSession, entry: ModelEntry) -> None:
    """The ONNX interface: z [N, latent_dim], y [N, num_classes] when conditional, image out."""
    inputs = {i.name: i for i in session.get_inputs()}
    expected = {"z": entry.latent_dim} | ({"y": entry.num_classes} if entry.conditional else {})
    if set(inputs) != set(expected):
        raise ModelFileError(f"inputs are {sorted(inputs)}, the manifest implies {sorted(expected)}")
    for name, width in expected.items():
        if inputs[name].type != "tensor(float)" or inputs[name].shape[1:] != [width]:
            raise ModelFileError(f"input {name} is {inputs[name].type} {inputs[name].shape}, expected float [N, {width}]")
    if [o.name for o in session.get_outputs()] != ["image"]:
        raise ModelFileError(f"outputs are {[o.name for o in session.get_outputs()]}, expected ['image']")


def open_model_session(path: Path, entry: ModelEntry, providers: list, threads: int) -> LocalSession:
    """The model file's session after its checksum and interface checks; ModelFileError when any fails."""
    session = open_onnx(path, entry.sha256, providers, threads)
    check_interface(session, entry)
    return LocalSession(session)


def zeros(entry: ModelEntry, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch of n inputs: z = 0 and, for a conditional model, y the uniform blend of the classes."""
    z = np.zeros((n, entry.latent_dim), np.float32)
    y = np.full((n, entry.num_classes), 1 / max(entry.num_classes, 1), np.float32) if entry.conditional else None
    return z, y
