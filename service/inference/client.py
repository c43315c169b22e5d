"""A worker's side of the inference process: `open_remote` asks it for a model's session and returns a
`RemoteModel`, the runtime's session there (service/runtime/model.py: Remote).

Each batch borrows a link (a connection and its shared buffer) from the model's pool, or opens one, so a
worker can have several batches of a model in flight; the first link stays in the pool, so the process
keeps the session pinned while this worker uses the model. A link that times out or breaks is closed,
never reused: a late answer would be taken for the next batch's.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
from pathlib import Path

import numpy as np

from service.inference import wire
from service.manifest import ModelEntry
from service.runtime.model import RemoteLost

OPEN_TIMEOUT_S = 120.0  # the first open of a file on CUDA loads cuDNN and warms every batch size


class Link:
    """One connection to the process for one model, used by one thread at a time."""

    def __init__(self, address: Path, request: dict, timeout_s: float):
        self.buffer: np.ndarray | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(str(address))
            self.opened = self.ask(wire.OPEN, request, timeout_s)
        except RemoteLost as err:  # nothing of ours was in flight: not a death to count against the model
            self.close()
            raise RemoteLost(str(err)) from None
        except BaseException:
            self.close()
            raise

    def ask(self, kind: int, payload: dict, timeout_s: float, fd: int | None = None) -> dict:
        """The process's answer to one message; RemoteLost when it errs, breaks or is late."""
        try:
            self.sock.settimeout(timeout_s)
            wire.send(self.sock, kind, payload, fd)
        except OSError as err:  # gone before this was sent: nothing of ours was in flight
            raise RemoteLost(f"the inference process went away: {err.strerror or err}") from None
        try:
            answer, body = wire.receive(self.sock)
        except TimeoutError:
            raise RemoteLost(f"the inference process did not answer within {timeout_s:.3g} s") from None
        except (EOFError, OSError, wire.ProtocolError) as err:
            raise RemoteLost(f"the inference process went away: {err or type(err).__name__}", died=True) from None
        if answer != wire.OK:
            raise RemoteLost(f"the inference process: {body.get('message', 'failed')}")
        return body

    def run(self, z: np.ndarray, y: np.ndarray | None, image_values: int, deadline_s: float) -> np.ndarray:
        n, z_width, y_width = len(z), z.shape[1], 0 if y is None else y.shape[1]
        buffer = self._fit(n * (z_width + y_width + image_values), deadline_s)
        np.copyto(buffer[:n * z_width].reshape(n, z_width), z, casting="same_kind")
        if y is not None:
            np.copyto(buffer[n * z_width:n * (z_width + y_width)].reshape(n, y_width), y, casting="same_kind")
        shape = self.ask(wire.RUN, {"n": n, "z": z_width, "y": y_width, "deadline": deadline_s}, deadline_s)["shape"]
        start = n * (z_width + y_width)
        return buffer[start:start + int(np.prod(shape))].reshape(shape).copy()

    def _fit(self, values: int, timeout_s: float) -> np.ndarray:
        """A shared buffer of at least `values` floats: when too small, a new memfd of the next power of two
        bytes (at least 64 KiB), handed to the process."""
        if self.buffer is not None and self.buffer.size >= values:
            return self.buffer
        size = max(1 << 16, 1 << (values * wire.FLOAT32 - 1).bit_length())
        fd = os.memfd_create("digitgen-batch")
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
            self.ask(wire.MAP, {"bytes": size}, timeout_s, fd)
        finally:
            os.close(fd)
        self.buffer = np.frombuffer(memory, np.float32)
        return self.buffer

    def close(self) -> None:
        self.sock.close()
        self.buffer = None


class RemoteModel:
    """A model's session in the inference process."""

    def __init__(self, address: Path, request: dict, image_values: int, first: Link):
        self.address, self.request, self.image_values = address, request, image_values
        self.provider: str = first.opened["provider"]
        self.pid: int = first.opened["pid"]
        self._idle = [first]
        self._lock = threading.Lock()
        self._closed = False

    def run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        return self.run_within(z, y, OPEN_TIMEOUT_S)

    def run_within(self, z: np.ndarray, y: np.ndarray | None, deadline_s: float) -> np.ndarray:
        link = self._borrow(deadline_s)
        try:
            images = link.run(z, y, self.image_values, deadline_s)
        except BaseException:
            link.close()
            raise
        self._give_back(link)
        return images

    def gone(self) -> bool:
        """Has the process closed an idle link (it exited, or was replaced)? Seen without a batch: a closed
        peer makes the socket readable with nothing to read."""
        with self._lock:
            idle = list(self._idle)
        for link in idle:
            try:
                if link.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return True
            except BlockingIOError:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        """Close every idle link, and the busy ones as they come back: the process drops the session once
        no worker holds a link to it."""
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for link in idle:
            link.close()

    def _borrow(self, timeout_s: float) -> Link:
        with self._lock:
            if self._closed:
                raise RemoteLost("the model's link to the inference process is closed")
            if self._idle:
                return self._idle.pop()
        try:
            link = Link(self.address, self.request, timeout_s)
        except OSError as err:
            raise RemoteLost(f"the inference process is unreachable: {err.strerror or err}") from None
        if link.opened["pid"] != self.pid:  # another process than the one this model was timed on
            link.close()
            raise RemoteLost(f"the inference process {self.pid} was replaced by {link.opened['pid']}")
        return link

    def _give_back(self, link: Link) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(link)
                return
        link.close()


def open_remote(address: Path, entry: ModelEntry, path: Path, warm_sizes: list[int],
                timeout_s: float = OPEN_TIMEOUT_S) -> RemoteModel:
    """The model opened (and warmed at warm_sizes) in the process at `address`; RemoteLost when it is
    unreachable, silent or cannot open the file (the reason says which)."""
    request = {"path": str(path.resolve()), "sha256": entry.sha256, "latent_dim": entry.latent_dim,
               "num_classes": entry.num_classes if entry.conditional else 0, "sizes": warm_sizes}
    try:
        first = Link(address, request, timeout_s)
    except OSError as err:
        raise RemoteLost(f"the inference process at {address} is unreachable: {err.strerror or err}") from None
    return RemoteModel(address, request, int(np.prod(entry.image_shape)), first)
