"""The one writer of the served model set (`app.state.models`): start-up's warm-up and every reload
build the next ModelSet off the event loop and swap it in with one assignment, one at a time.

Hot reload without downtime: `kill -HUP <pid of python -m service>` (forwarded to every worker) makes
each worker re-read the manifest. New and changed models are opened beside the old ones, checked (sha256,
interface), warmed and passed through their quality gate (service/quality.py); unchanged models keep their
sessions and queues. Requests already queued for a
replaced or removed model finish on the session they started with (its queue drains, then stops). A
manifest or model that fails leaves the old set serving: the reason is logged, shown in /readyz under
`left_out`, and counted in digitgen_reloads_total{result="failed"}.

SIGHUP stays blocked from a worker's first instruction (service/workers.py) until `listen` installs the
handler; a reload asked for during start-up is then delivered, and runs once warm-up is done. SIGHUPs that
arrive while a reload runs coalesce into one more reload after it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

from service.metrics import Metrics
from service.modelset import Loader, ModelSet, ReloadError, successor, warmed_set
from service.runtime.model_queue import ModelQueue

log = logging.getLogger("digitgen.reload")


class Reloader:
    def __init__(self, state, loader: Loader, metrics: Metrics):
        self.state, self.loader, self.metrics = state, loader, metrics
        self.failure: ReloadError | None = None  # the last reload's, until one succeeds
        self.stopped = False
        self.sizes = (1, loader.settings.max_n)  # the batch sizes every model is warmed at
        self._lock = asyncio.Lock()  # one writer at a time
        self._reloading = False  # a reload asked for by signal is under way
        self._again = False  # and another was asked for meanwhile: one more runs after it, however many came

    def listen(self) -> None:
        """Reload on SIGHUP, and let a SIGHUP held back during start-up through. Only the main thread's
        event loop can take signals (not a test client's)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request)
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            log.debug("no SIGHUP handler in this thread; reloads only through Reloader.reload()")
            return
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def request(self) -> None:
        """A SIGHUP: reload, coalescing those that arrive while one runs into one more reload after it (a
        storm of signals costs two reloads, not one per signal)."""
        if self._reloading:
            self._again = True
            return
        self._reloading = True
        asyncio.get_running_loop().create_task(self._reload_until_settled())

    async def _reload_until_settled(self) -> None:
        try:
            while True:
                self._again = False
                await self.reload()
                if not self._again:
                    return
        finally:
            self._reloading = False

    def left_out(self) -> dict[str, str]:
        return {self.failure.what: f"reload failed, the previous version serves: {self.failure.reason}"} \
            if self.failure else {}

    async def warm_up(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start-up: warm every model; the set without those that fail replaces the cold one. Then
        `on_ready` (the worker's supervisor learns it started), when any model is left to serve."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            new, retired = await loop.run_in_executor(None, warmed_set, self.state.models, self.sizes, self.loader)
            self.state.models = new
        await self._retire(retired)
        log.info("ready: %d model(s): %s", len(new.models), ", ".join(new.models) or "none")
        if on_ready is not None and new.ready:
            on_ready()

    async def stop(self) -> None:
        """Shutdown: wait for a reload under way; none starts after this."""
        async with self._lock:
            self.stopped = True

    async def reload(self) -> bool:
        """Re-read the manifest and swap the new set in; False (old set kept) when it fails."""
        async with self._lock:
            if self.stopped:
                return False
            old: ModelSet = self.state.models
            loop = asyncio.get_running_loop()
            try:
                new, retired = await loop.run_in_executor(None, successor, old, self.sizes, self.loader)
            except ReloadError as err:
                self.failure = err.with_traceback(None)  # its frames would keep the failed set's models alive
                self.metrics.reloads.labels("failed").inc()
                log.error("reload failed, the previous models keep serving: %s", err)
                return False
            self.state.models = new
            self.failure = None
            self.metrics.reloads.labels("ok").inc()
        await self._retire(retired)
        changed = [k for k, m in new.versions.items() if old.versions.get(k) is not m]
        log.info("reloaded: %d model(s) (%s new or changed, %d retired): %s", len(new.models),
                 ", ".join(changed) or "none", len(retired), ", ".join(new.models))
        return True

    @staticmethod
    async def _retire(queues: list[ModelQueue]) -> None:
        """Close the queues no set uses any more: their queued requests finish first (within the close's
        timeout: a model stuck in a call cannot hold a reload or a shutdown)."""
        loop = asyncio.get_running_loop()
        for queue in queues:
            await loop.run_in_executor(None, queue.close)
