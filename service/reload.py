"""Hot reload without downtime: `kill -HUP <pid of python -m service>` (forwarded to every worker) makes
each worker re-read the manifest and swap in the new model set.

New and changed models are opened beside the old ones, checked (sha256, interface) and warmed off the
event loop; then the registry and the batchers are swapped in one step of the event loop, so a request
sees either the old set or the new one, never a mix. Unchanged models keep their sessions and batchers.
Requests already queued for a replaced or removed model finish on the session they started with (its
batcher drains, then stops). A manifest or model that fails leaves the old set serving: the reason is
logged, shown in /readyz under `left_out`, and counted in digitgen_reloads_total{result="failed"}.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

from service.batching import Batcher
from service.config import Settings
from service.metrics import Metrics
from service.registry import LoadedModel, Registry, ReloadError

log = logging.getLogger("digitgen.reload")


class Reloader:
    def __init__(self, state, settings: Settings, metrics: Metrics, batcher_for: Callable[[LoadedModel], Batcher]):
        self.state, self.settings, self.metrics, self.batcher_for = state, settings, metrics, batcher_for
        self.failure: ReloadError | None = None  # the last reload's, until one succeeds
        self._lock = asyncio.Lock()

    def listen(self) -> None:
        """Reload on SIGHUP. Only the main thread's event loop can take signals (not a test client's)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            log.debug("no SIGHUP handler in this thread; reloads only through Reloader.reload()")

    def left_out(self) -> dict[str, str]:
        return {self.failure.what: f"reload failed, the previous version serves: {self.failure.reason}"} \
            if self.failure else {}

    async def reload(self) -> bool:
        """Re-read the manifest and swap the new set in; False (old set kept) when it fails."""
        async with self._lock:  # signals arriving during a reload queue behind it
            old: Registry = self.state.registry
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(None, old.successor, self.settings, (1, self.settings.max_n))
            except ReloadError as err:
                self.failure = err
                self.metrics.reloads.labels("failed").inc()
                log.error("reload failed, the previous models keep serving: %s", err)
                return False
            batchers: dict[str, Batcher] = self.state.batchers
            retired = [batchers[name] for name, model in old.models.items() if new.models.get(name) is not model]
            fresh = {name: self.batcher_for(model) for name, model in new.models.items()
                     if old.models.get(name) is not model}
            # The swap: no await from here to the end of the block, so no request sees half of it.
            kept = {name: batchers[name] for name in new.models if name not in fresh}
            self.state.registry = new
            batchers.clear()
            batchers.update(kept | fresh)
            self.failure = None
            self.metrics.reloads.labels("ok").inc()
        for batcher in retired:  # their queued requests finish on the sessions they started with
            await loop.run_in_executor(None, batcher.close)
        log.info("reloaded: %d model(s) (%s new or changed, %d retired): %s", len(new.models),
                 ", ".join(fresh) or "none", len(retired), ", ".join(new.models))
        return True
