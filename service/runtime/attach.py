"""A worker's models kept attached to the inference process: a thread that opens, in the process, every
model waiting for it (a new one, or one detached after a failure), retrying with a growing delay while the
process is away. Requests never wait for it: meanwhile their batches run on the worker's CPU sessions."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Iterable

from service.inference.client import open_remote
from service.runtime import devices
from service.runtime.model import ModelRuntime, RemoteLost

log = logging.getLogger("digitgen.attach")

IDLE_CHECK_S = 0.25  # how often models are checked for a detach
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 5.0)


class Attacher:
    def __init__(self, address: Path, models: Callable[[], Iterable[ModelRuntime]], max_n: int):
        self.address, self.models, self.max_n = address, models, max_n
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="attach", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            failed = False
            models = list(self.models())
            for model in models:
                model.check_remote()
            for model in [m for m in models if m.needs_attach]:
                if self._stop.is_set():
                    return
                try:
                    remote = open_remote(self.address, model.entry, model.path, devices.batch_sizes(self.max_n))
                except RemoteLost as err:
                    model.detach(None, str(err))
                    failed = True
                    continue
                except Exception:  # whatever it is, the model serves on; try again later
                    log.exception("model %s: attaching to the inference process failed", model.name)
                    failed = True
                    continue
                model.attach(remote, self.max_n)
            failures = failures + 1 if failed else 0
            self._stop.wait(RETRY_DELAYS_S[min(failures, len(RETRY_DELAYS_S)) - 1] if failures else IDLE_CHECK_S)
