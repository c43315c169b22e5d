"""The models being served, as one immutable value swapped whole.

A ModelSet holds the manifest, the models that loaded (each a ModelRuntime), their queues, the defaults,
why any model was left out, and the judges with what the quality gate measured of each model
(service/quality.py). Nothing edits a set: start-up opens one, warm-up and every reload build the next one
and the app swaps it in with one assignment (service/reload.py, the only writer). A request reads the set
once and takes its model and queue from that same set, so it never sees half of a swap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from service.config import Settings
from service.manifest import ENDPOINTS, Manifest, ManifestError, ModelEntry, load_manifest
from service.plan import Plan, make_plan
from service.quality import NO_JUDGES, GateResult, Judges, open_judges, screen
from service.runtime.model import ModelRuntime, OnChange, open_model
from service.runtime.model_queue import ModelQueue
from service.runtime.session import ModelFileError

log = logging.getLogger("digitgen.models")

# A body may hold DIGITGEN_MAX_N rows of the widest model's inputs as JSON: a float32 written by JSON takes
# at most 16 characters ("-0.123456789e-05"), its separator and indentation a few more; 48 per value leaves
# room for pretty-printed nesting, and the headroom for the rest of the request.
JSON_BYTES_PER_VALUE = 48
BODY_HEADROOM_BYTES = 64 * 1024


class ReloadError(Exception):
    """A reload that cannot complete: `what` is the model (or "manifest") that failed, `reason` why."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what, self.reason = what, reason


@dataclass(frozen=True)
class Loader:
    """How this worker opens models, judges and queues: what building a set needs from the app."""
    settings: Settings
    plan: Plan
    make_queue: Callable[[ModelRuntime], ModelQueue | None]  # None: a tool's set, never served
    on_change: OnChange | None = None

    @classmethod
    def of(cls, settings: Settings) -> Loader:
        """A loader with the plan of these settings and no queues (no requests), for tools and tests."""
        return cls(settings, make_plan(settings, quiet=True), lambda model: None)

    @property
    def models_dir(self) -> Path:
        return Path(self.settings.models_dir)

    def open(self, entry: ModelEntry) -> ModelRuntime:
        settings, plan = self.settings, self.plan
        return open_model(entry, self.models_dir, plan.worker_providers, plan.intra_op_threads,
                          plan.inference_socket is not None, settings.gpu_deadline_min_ms / 1000,
                          settings.request_timeout_s / 2, self.on_change)

    def judges(self, manifest: Manifest, kept: Judges = NO_JUDGES) -> Judges:
        return open_judges(manifest, self.models_dir, self.plan.worker_providers, self.plan.intra_op_threads, kept)


def body_limit(entries: list[ModelEntry], settings: Settings) -> int:
    """Largest request body accepted: DIGITGEN_MAX_BODY_BYTES, else what max_n images of the widest
    model's inputs take as JSON."""
    if settings.max_body_bytes is not None:
        return settings.max_body_bytes
    widest = max((e.latent_dim + e.num_classes for e in entries), default=0)
    return settings.max_n * widest * JSON_BYTES_PER_VALUE + BODY_HEADROOM_BYTES


@dataclass(frozen=True)
class ModelSet:
    manifest: Manifest
    models: Mapping[str, ModelRuntime]
    queues: Mapping[str, ModelQueue]
    failures: Mapping[str, str] = field(default_factory=dict)  # model name -> why it is not in this set
    warmed: bool = False
    max_body_bytes: int = BODY_HEADROOM_BYTES
    judges: Judges = field(default_factory=Judges)  # opened with the warm-up
    gated: Mapping[str, GateResult | None] = field(default_factory=dict)  # model -> what its gate measured

    @property
    def ready(self) -> bool:
        return self.warmed and bool(self.models)

    def default(self, endpoint: str) -> str | None:
        """The manifest's default for an endpoint when it loaded, else the first loaded model that fits."""
        name = getattr(self.manifest.defaults, endpoint)
        if name in self.models:
            return name
        fits = [n for n, m in self.models.items() if endpoint != "generate" or m.entry.conditional]
        return fits[0] if fits else None

    def defaults_of(self, name: str) -> list[str]:
        return [e for e in ENDPOINTS if self.default(e) == name]

    def conditional(self) -> list[str]:
        return [n for n, m in self.models.items() if m.entry.conditional]

    def unavailable(self, name: str) -> str:
        """Why `name` is not served and what is, for every route's 404: " (left out: ...); available: ..." """
        why = f" (left out: {self.failures[name]})" if name in self.failures else ""
        return f"{why}; available: {', '.join(self.models) or 'none'}"


def _make(manifest: Manifest, models: dict[str, ModelRuntime], queues: Mapping[str, ModelQueue | None],
          failures: dict[str, str], warmed: bool, settings: Settings, judges: Judges = NO_JUDGES,
          gated: dict[str, GateResult | None] | None = None) -> ModelSet:
    served = {name: queue for name, queue in queues.items() if queue is not None}
    return ModelSet(manifest, MappingProxyType(models), MappingProxyType(served), MappingProxyType(failures),
                    warmed, body_limit([m.entry for m in models.values()], settings), judges,
                    MappingProxyType(gated or {}))


def open_set(loader: Loader) -> ModelSet:
    """Start-up's set: every model of the manifest that opens and passes its checks, not yet warmed. A
    manifest that cannot be read raises ManifestError (nothing to serve: start-up stops)."""
    manifest = load_manifest(loader.models_dir)
    models, failures = {}, {}
    for entry in manifest.models:
        try:
            models[entry.name] = loader.open(entry)
        except ModelFileError as err:
            failures[entry.name] = str(err)
            log.error("model %s left out: %s", entry.name, err)
    return _make(manifest, models, {n: loader.make_queue(m) for n, m in models.items()}, failures, False,
                 loader.settings)


def warm(model: ModelRuntime, sizes: tuple[int, ...], judges: Judges, settings: Settings
         ) -> tuple[str | None, GateResult | None]:
    """Warm one model, then pass it through its quality gate: (the reason it failed, or None; what the
    gate measured, or None)."""
    started = time.perf_counter()
    try:
        model.warm(sizes)
    except Exception as err:  # a file that loads but cannot run must not take the others down
        return f"warm-up failed: {err}", None
    log.info("model %s warmed in %.0f ms", model.name, 1000 * (time.perf_counter() - started))
    return screen(model, judges, settings.quality_gate)


def warmed_set(current: ModelSet, sizes: tuple[int, ...], loader: Loader) -> tuple[ModelSet, list[ModelQueue]]:
    """The set with its judges opened, every model warmed and gated, and those that failed left out; and
    the queues of those left out, for the caller to close. Blocking: call it off the event loop."""
    models, queues, failures = dict(current.models), dict(current.queues), dict(current.failures)
    judges = loader.judges(current.manifest)
    retired, gated = [], {}
    for name, model in current.models.items():
        reason, gated[name] = warm(model, sizes, judges, loader.settings)
        if reason:
            log.error("model %s left out: %s", name, reason)
            failures[name] = reason
            del models[name]
            if name in queues:
                retired.append(queues.pop(name))
    return _make(current.manifest, models, queues, failures, True, loader.settings, judges, gated), retired


def successor(current: ModelSet, sizes: tuple[int, ...], loader: Loader) -> tuple[ModelSet, list[ModelQueue]]:
    """The set the manifest describes now, for a reload, and the current queues it no longer uses (the
    caller closes them once swapped). Models whose entry is unchanged carry on with their sessions and
    queues; new or changed ones are opened, checked, warmed and gated here (judges likewise: kept when
    unchanged). A manifest, or any model of it, that fails raises ReloadError and nothing changes.
    Blocking: call it off the event loop."""
    try:
        manifest = load_manifest(loader.models_dir)
    except ManifestError as err:
        raise ReloadError("manifest", str(err)) from None
    if not manifest.models:
        raise ReloadError("manifest", "it lists no models")
    judges = loader.judges(manifest, current.judges)
    models: dict[str, ModelRuntime] = {}
    fresh: dict[str, ModelRuntime] = {}
    gated: dict[str, GateResult | None] = {}
    try:
        for entry in manifest.models:
            kept = current.models.get(entry.name)
            if kept is not None and kept.entry == entry:
                models[entry.name], gated[entry.name] = kept, current.gated.get(entry.name)
                continue
            try:
                model = fresh[entry.name] = loader.open(entry)
            except ModelFileError as err:
                raise ReloadError(entry.name, str(err)) from None
            reason, gated[entry.name] = warm(model, sizes, judges, loader.settings)
            if reason:
                raise ReloadError(entry.name, reason)
            models[entry.name] = model
    except ReloadError:
        for model in fresh.values():  # what they hold in the inference process goes now, not at GC
            model.close()
        raise
    queues = {name: current.queues[name] if name not in fresh else loader.make_queue(model)
              for name, model in models.items()}
    retired = [q for name, q in current.queues.items() if queues.get(name) is not q]
    return _make(manifest, models, queues, {}, True, loader.settings, judges, gated), retired
