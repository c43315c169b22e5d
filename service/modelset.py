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
from service.manifest import ENDPOINTS, Manifest, ManifestError, ModelEntry, load_manifest, sha256_of
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
    models: Mapping[str, ModelRuntime]  # name -> the version unpinned requests get
    queues: Mapping[str, ModelQueue]  # name@version -> its queue
    failures: Mapping[str, str] = field(default_factory=dict)  # name (or name@version) -> why it is left out
    warmed: bool = False
    max_body_bytes: int = BODY_HEADROOM_BYTES
    judges: Judges = field(default_factory=Judges)  # opened with the warm-up
    gated: Mapping[str, GateResult | None] = field(default_factory=dict)  # name@version -> what its gate measured
    versions: Mapping[str, ModelRuntime] = field(default_factory=dict)  # name@version -> every version loaded

    def version(self, name: str, version: str) -> ModelRuntime | None:
        return self.versions.get(f"{name}@{version}")

    def versions_of(self, name: str) -> list[ModelRuntime]:
        return [m for m in self.versions.values() if m.name == name]

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


def _make(manifest: Manifest, runtimes: dict[str, ModelRuntime], queues: Mapping[str, ModelQueue | None],
          failures: dict[str, str], warmed: bool, settings: Settings, judges: Judges = NO_JUDGES,
          gated: dict[str, GateResult | None] | None = None) -> ModelSet:
    """The set: `runtimes` and `queues` by name@version; a model is served unpinned by its rollout's version
    when that one loaded (else the name is left out, with its reason)."""
    models = {}
    for name in manifest.names:
        served = runtimes.get(manifest.model(name).key)
        if served is not None:
            models[name] = served
        elif name not in failures:
            failures[name] = failures.get(manifest.model(name).key, "its served version did not load")
    served_queues = {key: queue for key, queue in queues.items() if queue is not None}
    return ModelSet(manifest, MappingProxyType(models), MappingProxyType(served_queues), MappingProxyType(failures),
                    warmed, body_limit([m.entry for m in runtimes.values()], settings), judges,
                    MappingProxyType(gated or {}), MappingProxyType(runtimes))


def open_set(loader: Loader) -> ModelSet:
    """Start-up's set: every model of the manifest that opens and passes its checks, not yet warmed. A
    manifest that cannot be read raises ManifestError (nothing to serve: start-up stops)."""
    manifest = load_manifest(loader.models_dir)
    runtimes, failures = {}, {}
    for entry in manifest.models:
        try:
            runtimes[entry.key] = loader.open(entry)
        except ModelFileError as err:
            failures[_failure_key(manifest, entry)] = str(err)
            log.error("model %s left out: %s", entry.key, err)
    return _make(manifest, runtimes, {k: loader.make_queue(m) for k, m in runtimes.items()}, failures, False,
                 loader.settings)


def _failure_key(manifest: Manifest, entry: ModelEntry) -> str:
    """Where a version that failed is reported: under its name when it is the one served unpinned."""
    return entry.name if manifest.model(entry.name).key == entry.key else entry.key


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
    runtimes, queues, failures = dict(current.versions), dict(current.queues), dict(current.failures)
    judges = loader.judges(current.manifest)
    retired, gated = [], {}
    for key, model in current.versions.items():
        reason, gated[key] = warm(model, sizes, judges, loader.settings)
        if reason:
            log.error("model %s left out: %s", key, reason)
            failures[_failure_key(current.manifest, model.entry)] = reason
            del runtimes[key]
            if key in queues:
                retired.append(queues.pop(key))
    return _make(current.manifest, runtimes, queues, failures, True, loader.settings, judges, gated), retired


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
    runtimes: dict[str, ModelRuntime] = {}
    fresh: dict[str, ModelRuntime] = {}
    gated: dict[str, GateResult | None] = {}
    try:
        for entry in manifest.models:
            kept = current.versions.get(entry.key)
            if kept is not None and kept.entry == entry:
                _still_on_disk(loader.models_dir, entry, _failure_key(manifest, entry))
                runtimes[entry.key], gated[entry.key] = kept, current.gated.get(entry.key)
                continue
            what = _failure_key(manifest, entry)
            try:
                model = fresh[entry.key] = loader.open(entry)
            except ModelFileError as err:
                raise ReloadError(what, str(err)) from None
            reason, gated[entry.key] = warm(model, sizes, judges, loader.settings)
            if reason:
                raise ReloadError(what, reason)
            runtimes[entry.key] = model
    except ReloadError:
        for model in fresh.values():  # what they hold in the inference process goes now, not at GC
            model.close()
        raise
    queues = {key: current.queues[key] if key not in fresh else loader.make_queue(model)
              for key, model in runtimes.items()}
    retired = [q for key, q in current.queues.items() if queues.get(key) is not q]
    return _make(manifest, runtimes, queues, {}, True, loader.settings, judges, gated), retired


def _still_on_disk(models_dir: Path, entry: ModelEntry, what: str) -> None:
    """A kept version's file is checked again at a reload: one emptied or replaced since is caught now,
    not later by a worker that opens it."""
    path = models_dir / entry.file
    try:
        actual = sha256_of(path)
    except OSError as err:
        raise ReloadError(what, f"{path} cannot be read: {err.strerror or err}") from None
    if actual != entry.sha256:
        raise ReloadError(what, f"{path} changed on disk since it was loaded (sha256 {actual[:12]}..., the "
                                     f"manifest says {entry.sha256[:12]}...)")
