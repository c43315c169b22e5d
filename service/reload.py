"""The one writer of the served model set (`app.state.models`): each decision of service/lifecycle.py is
prepared off the event loop (service/modelset.py: opened, warmed) and swapped in with one assignment.

Hot reload without downtime: `kill -HUP <pid of python -m service>`. Requests already queued for a
replaced or removed version finish on the session they started with (its queue drains, then stops). A
manifest or version that fails leaves the old set serving: the reason is logged, shown in /readyz under
`left_out`, and counted in digitgen_reloads_total{result="failed"}. SIGHUPs that arrive while a reload runs
coalesce into one more reload after it.

Two owners of the decisions, one way of serving them:
- `Reloader`, a process alone (one worker, or an app in a test): it decides itself and swaps.
- `Follower`, a supervised worker: the supervisor decides once for all (service/coordinator.py); the worker
  prepares each decision, says so, and swaps only when told that every worker has prepared it (or drops it
  when told that one could not). It serves nothing until its first set is committed, so a replacement
  worker joins with exactly the set the others serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Callable

from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.modelset import Decision, Loader, Prepared, ReloadError, prepare
from service.runtime.model_queue import ModelQueue

log = logging.getLogger("digitgen.reload")


class _Writer:
    """What both owners share: the swap, the retirement of queues, the failure shown in /readyz."""

    def __init__(self, state, loader: Loader):
        self.state, self.loader = state, loader
        self.failure: tuple[str, str] | None = None  # (what, why) of the last reload, until one succeeds
        self.sizes = (1, loader.settings.max_n)  # the batch sizes every model is warmed at
        self.stopped = False

    def left_out(self) -> dict[str, str]:
        return {self.failure[0]: f"reload failed, the previous version serves: {self.failure[1]}"} \
            if self.failure else {}

    async def _prepare(self, decision: Decision, strict: bool = True) -> Prepared:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, prepare, self.state.models, decision, self.sizes, self.loader, strict)

    async def _swap(self, prepared: Prepared) -> None:
        old, new = self.state.models, prepared.models
        self.state.models = new
        await _retire(prepared.retired)
        changed = [k for k, m in new.versions.items() if old.versions.get(k) is not m]
        log.info("serving generation %d: %d model(s) (%s new or changed, %d retired): %s", new.generation,
                 len(new.models), ", ".join(changed) or "none", len(prepared.retired), ", ".join(new.models) or "none")


class Reloader(_Writer):
    """A process alone: decides (service/lifecycle.py) and swaps, one reload at a time."""

    def __init__(self, state, loader: Loader, metrics: Metrics, lifecycle: Lifecycle | None = None):
        super().__init__(state, loader)
        self.metrics = metrics
        self.lifecycle = lifecycle or Lifecycle(loader.settings, loader.plan)
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
        """A SIGHUP: reload, coalescing those that arrive while one runs into one more reload after it."""
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

    async def warm_up(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start-up: decide (every version gated; those refused are left out), warm what is admitted, swap
        it in. Then `on_ready`, when any model is left to serve."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                decision = await loop.run_in_executor(None, self.lifecycle.decide, False)
                prepared = await self._prepare(decision, strict=False)
            except ReloadError as err:  # a manifest gone since start-up: nothing to serve
                self.failure = (err.what, err.reason)
                log.error("no models to serve: %s", err)
                return
            self.lifecycle.commit(decision)
            await self._swap(prepared)
        if on_ready is not None and prepared.models.ready:
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
            loop = asyncio.get_running_loop()
            try:
                decision = await loop.run_in_executor(None, self.lifecycle.decide, True)
                prepared = await self._prepare(decision)
            except ReloadError as err:
                self.failure = (err.what, err.reason)
                self.metrics.reloads.labels("failed").inc()
                log.error("reload failed, the previous models keep serving: %s", err)
                return False
            self.lifecycle.commit(decision)
            self.failure = None
            self.metrics.reloads.labels("ok").inc()
            await self._swap(prepared)
        return True


class Follower(_Writer):
    """A supervised worker's side of the lifecycle: it prepares what the supervisor decided and switches
    when told (messages in service/coordinator.py)."""

    def __init__(self, state, loader: Loader, channel):
        super().__init__(state, loader)
        self.channel = channel  # a multiprocessing Connection to the supervisor
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._first: asyncio.Future | None = None  # the first set committed (or why it could not be prepared)
        self._pending: Prepared | None = None
        self._task: asyncio.Task | None = None

    def start(self, decision: Decision, failure: tuple[str, str] | None) -> None:
        """Prepare the decision the worker was started with, and follow the supervisor from then on."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._inbox.put_nowait(("prepare", decision, failure))
        threading.Thread(target=self._receive, args=(loop,), name="lifecycle", daemon=True).start()
        self._task = loop.create_task(self._follow())
        self._task.add_done_callback(_end_if_failed)

    async def first(self) -> None:
        """Until the first set is committed: the worker listens only then. ReloadError when it cannot be
        prepared here (the worker does not start)."""
        assert self._first is not None
        await self._first

    def listen(self) -> None:
        """SIGHUP goes to the supervisor, which decides; a worker ignores one sent to it directly."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    async def stop(self) -> None:
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
        if self._pending is not None:
            self._pending.abandon()

    def _receive(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                if not self.stopped:  # the supervisor is gone: nobody decides for this worker any more
                    log.critical("the supervisor's channel closed; this worker exits")
                    os._exit(70)
                return
            try:
                loop.call_soon_threadsafe(self._inbox.put_nowait, message)
            except RuntimeError:  # the event loop closed: the worker is shutting down
                return

    def _send(self, *message) -> None:
        try:
            self.channel.send(message)
        except (OSError, ValueError) as err:
            log.warning("the supervisor cannot be told %s: %s", message[0], err)

    async def _follow(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                await self._handle(*message)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bug, or a thread or memory that ran out: say so, never go silent
                log.exception("lifecycle message %s failed", message[0])
                if message[0] == "prepare":
                    self._send("prepared", message[1].generation, ("worker", f"preparing failed: {err}"))
                if self._first is not None and not self._first.done():
                    self._first.set_exception(ReloadError("worker", f"{message[0]} failed: {err}"))

    async def _handle(self, kind: str, *args) -> None:
        if kind == "prepare":
            decision, self.failure = args
            await self._on_prepare(decision)
        elif kind == "commit" and self._pending is not None and self._pending.models.generation == args[0]:
            prepared, self._pending = self._pending, None
            await self._swap(prepared)
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            self._send("serving", args[0])
        elif kind == "abort":
            generation, self.failure = args
            if self._pending is not None and self._pending.models.generation == generation:
                self._pending.abandon()
                self._pending = None
        elif kind == "failed":
            self.failure = args[0]

    async def _on_prepare(self, decision: Decision) -> None:
        if self._pending is not None:  # superseded before it was committed
            self._pending.abandon()
            self._pending = None
        try:
            self._pending = await self._prepare(decision)
        except ReloadError as err:
            log.error("generation %d cannot be prepared here: %s", decision.generation, err)
            self._send("prepared", decision.generation, (err.what, err.reason))
            if self._first is not None and not self._first.done():
                self._first.set_exception(err)
            return
        self._send("prepared", decision.generation, None)


def _end_if_failed(task: asyncio.Task) -> None:
    """The follower's task ended other than by cancellation: the worker can no longer follow its
    supervisor, so it exits and is replaced."""
    if not task.cancelled():
        log.critical("the lifecycle task ended (%r); this worker exits", task.exception())
        os._exit(70)


async def _retire(queues: list[ModelQueue]) -> None:
    """Close the queues no set uses any more: their queued requests finish first (within the close's
    timeout: a model stuck in a call cannot hold a reload or a shutdown)."""
    loop = asyncio.get_running_loop()
    for queue in queues:
        await loop.run_in_executor(None, queue.close)
