"""The judge's live figure of what each model serves, scored off the request path.

A model's queue hands a few rows of a batch's output to `LiveQuality.offer` (at most LIVE_ROWS rows every
LIVE_INTERVAL_S per model, dropped when the scorer is behind); one thread per worker scores them with the
model's judge and keeps each version's last LIVE_WINDOW scores (a canary beside its default), shown as a
gauge in /metrics and in /models/{name}.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from service.metrics import Metrics
from service.modelset import ModelSet
from service.quality import Judge
from service.runtime.model import ModelRuntime

log = logging.getLogger("digitgen.quality")

LIVE_ROWS = 4            # rows of a batch handed to the scorer
LIVE_INTERVAL_S = 0.25   # at most one hand-off per model this often: <= 16 rows/s per model and worker
LIVE_QUEUE = 64          # hand-offs waiting for the scorer; more are dropped
LIVE_WINDOW = 256        # the live figure covers each model's last this many scored samples


class LiveQuality:
    """The judge's confidence over what each model served lately, scored off the request path."""

    def __init__(self, metrics: Metrics, current: Callable[[], ModelSet]):
        self._current = current  # the set being served: its judges, and whether a model still is in it
        self._confidence, self._scored = metrics.live_confidence, metrics.live_scored
        self._rows: queue.Queue = queue.Queue(LIVE_QUEUE)
        self._due: dict[str, float] = {}
        self._windows: dict[str, deque] = {}  # name@version -> its last scores
        self.live: dict[str, dict] = {}  # name@version -> {"confidence", "samples"}, each replaced whole
        self._thread = threading.Thread(target=self._score, name="live-quality", daemon=True)
        self._thread.start()

    def offer(self, model: ModelRuntime, output: np.ndarray) -> None:
        """From a batch thread once the model ran: hand a few rows of its output [N, 1, 28, 28] to the scorer,
        at most every LIVE_INTERVAL_S per model; dropped when the scorer is behind."""
        now = time.monotonic()
        if now < self._due.get(model.key, 0.0):
            return
        self._due[model.key] = now + LIVE_INTERVAL_S
        try:
            self._rows.put_nowait((model, output[:LIVE_ROWS].copy()))
        except queue.Full:
            pass

    def snapshot(self, model: ModelRuntime) -> dict | None:
        """The live figure of this version of the model, or None before any of its output was scored."""
        live = self.live.get(model.key)
        if live is None:
            return None
        return {"confidence": live["confidence"], "samples": live["samples"], "window": LIVE_WINDOW}

    def close(self) -> None:
        self._rows.put(None)
        self._thread.join()

    def _judge_of(self, model: ModelRuntime) -> Judge | None:
        current = self._current()
        if current.versions.get(model.key) is not model:  # replaced or removed since: its rows are stale
            return None
        judge = current.manifest.judge_for(model.entry)
        return current.judges.loaded.get(judge.name) if judge else None

    def _score(self) -> None:
        while (item := self._rows.get()) is not None:
            model, rows = item
            try:
                judge = self._judge_of(model)
                if judge is None:
                    continue
                confident = judge.probabilities(rows).max(1) > judge.entry.confident
            except Exception as err:  # live scoring must never stop: log, and score the next rows
                log.warning("model %s: live scoring failed: %s", model.name, err)
                continue
            window = self._windows.setdefault(model.key, deque(maxlen=LIVE_WINDOW))
            window.extend(confident.tolist())
            value = sum(window) / len(window)
            self.live[model.key] = {"confidence": value, "samples": len(window)}
            self._confidence.labels(model.name, model.entry.version).set(value)
            self._scored.labels(model.name, model.entry.version).set(len(window))
