"""The models being served, as one immutable value swapped whole.

A ModelSet holds the manifest, the models that loaded (each a ModelRuntime), their queues, the defaults,
why any model was left out, and the judges with what the quality gate measured of each model
(service/quality.py). Nothing edits a set: start-up opens one, and each decision of service/lifecycle.py is
prepared into the next one (`prepare`: opened and warmed) and swapped in with one assignment
(service/reload.py, the only writer). A request reads the set once and takes its model and queue from that
same set, so it never sees half of a swap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from service.config import Settings
from service.manifest import ENDPOINTS, Manifest, ModelEntry, load_manifest, parse_manifest
from service.plan import Plan, make_plan
from service.quality import NO_JUDGES, GateResult, Judges, open_judges
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

    def open(self, entry: ModelEntry, path: Path | None = None) -> ModelRuntime:
        """The version's runtime; from `path` (the checked copy of its file) when given."""
        settings, plan = self.settings, self.plan
        return open_model(entry, self.models_dir, plan.worker_providers, plan.intra_op_threads,
                          plan.inference_socket is not None, settings.gpu_deadline_min_ms / 1000,
                          settings.request_timeout_s / 2, self.on_change, path)

    def judges(self, manifest: Manifest, kept: Judges = NO_JUDGES, files: Mapping[str, str] | None = None) -> Judges:
        return open_judges(manifest, self.models_dir, self.plan.worker_providers, self.plan.intra_op_threads, kept,
                           files)


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
    models: Mapping[str, ModelRuntime]  # name -> the version unpinned requests get (but a canary's share)
    queues: Mapping[str, ModelQueue]  # name@version -> its queue
    failures: Mapping[str, str] = field(default_factory=dict)  # name (or name@version) -> why it is left out
    warmed: bool = False
    max_body_bytes: int = BODY_HEADROOM_BYTES
    judges: Judges = field(default_factory=Judges)  # opened with the warm-up
    gated: Mapping[str, GateResult | None] = field(default_factory=dict)  # name@version -> what its gate measured
    versions: Mapping[str, ModelRuntime] = field(default_factory=dict)  # name@version -> every version loaded
    generation: int = 0  # the decision it was built from (service/lifecycle.py); 0: opened cold, not decided
    canaries: Mapping[str, tuple[ModelRuntime, float]] = field(default_factory=dict)  # name -> (version, share)

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
          gated: dict[str, GateResult | None] | None = None, generation: int = 0) -> ModelSet:
    """The set: `runtimes` and `queues` by name@version; a model is served unpinned by its rollout's version
    when that one loaded (else the name is left out, with its reason)."""
    models = {}
    for name in manifest.names:
        served = runtimes.get(manifest.model(name).key)
        if served is not None:
            models[name] = served
        elif name not in failures:
            failures[name] = failures.get(manifest.model(name).key, "its served version did not load")
    canaries = {}
    for name in models:
        canary = manifest.canary(name)
        if canary is not None and canary[0].key in runtimes:
            canaries[name] = (runtimes[canary[0].key], canary[1])
    served_queues = {key: queue for key, queue in queues.items() if queue is not None}
    return ModelSet(manifest, MappingProxyType(models), MappingProxyType(served_queues), MappingProxyType(failures),
                    warmed, body_limit([m.entry for m in runtimes.values()], settings), judges,
                    MappingProxyType(gated or {}), MappingProxyType(runtimes), generation, MappingProxyType(canaries))


def open_set(loader: Loader) -> ModelSet:
    """Start-up's set: every model of the manifest that opens and passes its checks, not yet warmed. A
    manifest that cannot be read raises ManifestError (nothing to serve: start-up stops)."""
    manifest = load_manifest(loader.models_dir)
    runtimes, failures = {}, {}
    for entry in manifest.models:
        try:
            runtimes[entry.key] = loader.open(entry)
        except ModelFileError as err:
            failures[failure_key(manifest, entry)] = str(err)
            log.error("model %s left out: %s", entry.key, err)
    return _make(manifest, runtimes, {k: loader.make_queue(m) for k, m in runtimes.items()}, failures, False,
                 loader.settings)


def failure_key(manifest: Manifest, entry: ModelEntry) -> str:
    """Where a version that failed is reported: under its name when it is the one served unpinned."""
    return entry.name if manifest.model(entry.name).key == entry.key else entry.key


@dataclass(frozen=True)
class Decision:
    """What the service serves, decided once for every worker (service/lifecycle.py)."""
    generation: int  # 1, 2, ... in the order decided; a worker's /readyz and /models say which it serves
    manifest_text: str
    admitted: dict[str, GateResult | None]  # name@version -> what its gate measured (None: not gated)
    refused: dict[str, str]  # name (its served version) or name@version -> why
    files: dict[str, str] = field(default_factory=dict)  # sha256 -> the checked copy of each admitted file (and
    # judge) the supervisor keeps: workers open these, never the models folder, which may change under them

    def manifest(self) -> Manifest:
        """The manifest as the decision read it (its text: the folder may have changed since)."""
        return parse_manifest(self.manifest_text)


@dataclass(frozen=True)
class Prepared:
    """A set built from a decision, opened and warmed but not yet served: `commit` when every worker has
    one, else `abandon`."""
    models: ModelSet
    fresh: list[ModelRuntime]  # opened for it: closed if it is abandoned
    retired: list[ModelQueue]  # the current set's queues it no longer uses: closed once it serves

    def abandon(self) -> None:
        queues = {id(q.model): q for q in self.models.queues.values()}
        for model in self.fresh:
            queue = queues.get(id(model))
            queue.close() if queue is not None else model.close()


def prepare(current: ModelSet | None, decision: Decision, sizes: tuple[int, ...], loader: Loader,
            strict: bool = True) -> Prepared:
    """The set `decision` admits: versions this worker already serves unchanged carry on with their sessions
    and queues; the others are opened and warmed here (the gate ran where the decision was made). A file
    that does not open or warm here raises ReloadError, with nothing left open (not `strict`, at start-up:
    it is left out, with its reason). Blocking: off the event loop."""
    manifest = decision.manifest()
    runtimes: dict[str, ModelRuntime] = {}
    fresh: list[ModelRuntime] = []
    failures = dict(decision.refused)
    try:
        for entry in manifest.models:
            if entry.key not in decision.admitted:
                continue
            try:
                runtimes[entry.key] = _ready(entry, manifest, current, sizes, loader, fresh, decision.files)
            except ReloadError as err:
                if strict:
                    raise
                failures[err.what] = err.reason
                log.error("model %s left out: %s", entry.key, err.reason)
    except ReloadError:
        for model in fresh:  # what they hold in the inference process goes now, not at GC
            model.close()
        raise
    old_queues = current.queues if current is not None else {}
    queues = {key: old_queues[key] if key in old_queues else loader.make_queue(model)
              for key, model in runtimes.items()}
    retired = [q for key, q in old_queues.items() if queues.get(key) is not q]
    judges = loader.judges(manifest, current.judges if current is not None else NO_JUDGES, decision.files)
    models = _make(manifest, runtimes, queues, failures, True, loader.settings, judges,
                   {key: decision.admitted[key] for key in runtimes}, decision.generation)
    return Prepared(models, fresh, retired)


def _ready(entry: ModelEntry, manifest: Manifest, current: ModelSet | None, sizes: tuple[int, ...], loader: Loader,
           fresh: list[ModelRuntime], files: Mapping[str, str]) -> ModelRuntime:
    """One admitted version, warmed: the current set's when it serves it already, else opened (and added
    to `fresh`)."""
    kept = current.versions.get(entry.key) if current is not None else None
    if kept is not None and kept.entry == entry and current is not None and current.warmed:
        return kept
    if kept is not None and kept.entry == entry:  # opened cold at start-up: warm it now
        model = kept
    else:
        try:
            copy = files.get(entry.sha256)
            model = loader.open(entry, Path(copy) if copy else None)
        except ModelFileError as err:
            raise ReloadError(failure_key(manifest, entry), str(err)) from None
        fresh.append(model)
    started = time.perf_counter()
    try:
        model.warm(sizes)
    except Exception as err:  # a file that loads but cannot run
        raise ReloadError(failure_key(manifest, entry), f"warm-up failed: {err}") from None
    log.info("model %s warmed in %.0f ms", entry.key, 1000 * (time.perf_counter() - started))
    return model
