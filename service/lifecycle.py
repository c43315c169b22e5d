"""What the service serves, decided once for every worker.

A Decision (service/modelset.py) is the manifest as read, the versions admitted with what their gate
measured, the versions refused and why, and where the checked copy of each file lies. `Lifecycle.decide`
makes one: it reads and validates the manifest, reads every file (models and judges) and checks its sha256
(the kept ones too: a file emptied or replaced since is caught at the SIGHUP), keeps a copy of the bytes it
checked in a private folder (named by their sha256, never written over), opens each version from it, gates
it on the CPU (service/quality.py; measurements remembered in service/gate_cache.py), holds it to its
kind's floors and, when it would become a model's served version, to the version it replaces
(service/admission.py). Workers open the copies, never the models folder, which may change under them.

With several workers the supervisor owns the Lifecycle (service/coordinator.py) and the workers prepare
and switch to its decisions; a single process owns it itself (service/reload.py).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path

from service import admission
from service.config import Settings
from service.gate_cache import GateCache
from service.manifest import MANIFEST_NAME, Manifest, ManifestError, ModelEntry, parse_manifest
from service.modelset import Decision, Loader, ModelSet, ReloadError, failure_key, prepare
from service.plan import Plan
from service.providers import CPU
from service.quality import GATE_SAMPLES, NO_JUDGES, GateResult, Judges, judged, measure
from service.runtime.session import ModelFileError

log = logging.getLogger("digitgen.lifecycle")


class Lifecycle:
    """Decides the next model set: one instance per service, the only one that gates."""

    def __init__(self, settings: Settings, plan: Plan, cache: GateCache | None = None):
        # its own sessions on the CPU, never a GPU's nor the inference process's: it only measures, and a
        # device context here would sit outside every budget
        self.loader = Loader(settings, replace(plan, inference_socket=None, device_providers=(CPU,)),
                             lambda model: None)
        self.provider = CPU
        self.cache = cache or GateCache(settings.gate_cache_dir)
        self.copies = Path(tempfile.mkdtemp(prefix="digitgen-models-"))  # 0700: this user's only
        weakref.finalize(self, shutil.rmtree, self.copies, True)
        self._previous: Decision | None = None  # its copies stay too: a worker may still be opening them
        self.judges: Judges = NO_JUDGES
        self.current: Decision | None = None  # the decision being served
        self.decided = 0  # decisions made, committed or not: the next one's generation follows

    @property
    def models_dir(self) -> Path:
        return self.loader.models_dir

    def decide(self, strict: bool) -> Decision:
        """The next decision. `strict` (a reload): any version refused raises ReloadError, and the caller keeps
        the current set; otherwise (start-up) refused versions are left out, named in `refused`."""
        path = self.models_dir / MANIFEST_NAME
        try:
            text = path.read_text()
            manifest = parse_manifest(text, str(path))
        except OSError as err:
            raise ReloadError("manifest", f"{path}: cannot read the manifest ({err.strerror})") from None
        except ManifestError as err:
            raise ReloadError("manifest", str(err)) from None
        if not manifest.models:
            raise ReloadError("manifest", "it lists no models")
        files: dict[str, str] = {}
        for judge in manifest.judges:  # a judge that fails here fails to load, named by open_judges
            try:
                files[judge.sha256] = self._copy(judge.file, judge.sha256, judge.name)
            except ReloadError:
                pass
        self.judges = self.loader.judges(manifest, self.judges, files)
        admitted: dict[str, GateResult | None] = {}
        refused: dict[str, str] = {}
        for entry in manifest.models:
            try:
                files[entry.sha256] = self._copy(entry.file, entry.sha256, failure_key(manifest, entry))
                admitted[entry.key] = self._admit(entry, manifest, Path(files[entry.sha256]))
            except ReloadError as err:
                refused[failure_key(manifest, entry)] = err.reason
        refused |= self._no_worse(manifest, admitted)
        for key in refused:
            admitted.pop(key if "@" in key else manifest.model(key).key, None)
            log.error("model %s refused: %s", key, refused[key])
        if strict and refused:
            raise ReloadError(", ".join(refused), "; ".join(refused.values()))
        self.decided += 1
        used = {e.sha256 for e in manifest.models if e.key in admitted} | {j.sha256 for j in manifest.judges}
        return Decision(self.decided, text, admitted, refused, {sha: files[sha] for sha in used if sha in files})

    def commit(self, decision: Decision) -> None:
        """`decision` is what every worker serves now: the next reload compares with it. The copies neither it
        nor the one before it uses are removed."""
        if self.current is not None and self.current is not decision:
            self._previous = self.current
        self.current = decision
        keep = {Path(p).name for d in (decision, self._previous) if d is not None for p in d.files.values()}
        for copy in self.copies.glob("*.onnx"):
            if copy.name not in keep:
                copy.unlink(missing_ok=True)

    def _copy(self, file: str, sha256: str, what: str) -> str:
        """The checked copy of a file the manifest names: read once, its sha256 checked, written under its
        sha256 (once: the same content is the same copy). ReloadError when missing, unreadable or another file."""
        target = self.copies / f"{sha256}.onnx"
        if target.is_file():  # the bytes checked before; the models folder's file is checked again all the same
            _same_file(self.models_dir, file, sha256, what)
            return str(target)
        content = _same_file(self.models_dir, file, sha256, what)
        temporary = target.with_name(f".{sha256}.tmp")
        temporary.write_bytes(content)
        temporary.replace(target)
        return str(target)

    def _admit(self, entry: ModelEntry, manifest: Manifest, copy: Path) -> GateResult | None:
        """Open and gate one version (ReloadError with the reason when refused); what the gate measured."""
        kept = self._kept(entry)
        if not isinstance(kept, bool):
            return kept
        try:
            model = self.loader.open(entry, copy)
        except ModelFileError as err:
            raise ReloadError(entry.key, str(err)) from None
        try:
            return self._gate(model, entry, manifest)
        finally:
            model.close()

    def _kept(self, entry: ModelEntry) -> GateResult | None | bool:
        """The current decision's result for an unchanged entry (False: none to keep)."""
        current = self.current
        if current is None or entry.key not in current.admitted:
            return False
        same = next((e for e in current.manifest().models if e.key == entry.key), None)
        return current.admitted[entry.key] if same == entry and current.admitted[entry.key] is not None else False

    def _gate(self, model, entry: ModelEntry, manifest: Manifest) -> GateResult | None:
        recorded = entry.quality
        if not self.loader.settings.quality_gate:
            return None
        if recorded is None:
            log.warning("model %s: its manifest entry records no quality figures; served without the quality gate",
                        entry.key)
            return None
        judge = self.judges.loaded.get(recorded.judge)
        if judge is None:
            raise ReloadError(entry.key, f"quality gate: judge {recorded.judge} is not loaded "
                                         f"({self.judges.failed.get(recorded.judge)})")
        key = self.cache.key(entry.sha256, judge.entry.sha256, recorded.seed, min(recorded.samples, GATE_SAMPLES),
                             self.provider)
        measured = self.cache.get(key)
        if measured is None:
            try:
                measured = measure(model, judge, recorded)
            except Exception as err:  # a model or judge that cannot run is refused, never takes the others down
                raise ReloadError(entry.key, f"quality gate: scoring failed: {err}") from None
            self.cache.put(key, measured)
            how = f"measured in {1000 * measured.seconds:.0f} ms"
        else:
            how = "as measured before (cached)"
        result = judged(entry, judge.entry, measured)
        if result.shortfalls:
            raise ReloadError(entry.key, "quality gate: " + "; ".join(result.shortfalls))
        log.info("model %s passed the quality gate, %s (%d samples): %s", entry.key, how, result.samples,
                 ", ".join(f"{k} {v:.4f}" for k, v in result.measured.items()))
        return result

    def _no_worse(self, manifest: Manifest, admitted: dict[str, GateResult | None]) -> dict[str, str]:
        """A version about to become a model's served one must not be worse than the version it replaces,
        unless its entry says why (`accepted_worse`)."""
        current = self.current
        if current is None:
            return {}
        before = current.manifest()
        refused = {}
        for name in manifest.names:
            new = manifest.model(name)
            if name not in before.names or new.key == before.model(name).key or new.accepted_worse:
                continue
            old = before.model(name)
            new_result, old_result = admitted.get(new.key), current.admitted.get(old.key)
            if new_result is None or old_result is None:
                continue
            worse = admission.worse_than(new_result.measured, new_result.samples, old_result.measured,
                                         old_result.samples, old.version)
            if worse:
                refused[name] = ("worse than the version it would replace: " + "; ".join(worse)
                                 + "; export it with --accept-worse REASON to serve it anyway")
        return refused


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _same_file(models_dir: Path, file: str, sha256: str, what: str) -> bytes:
    """The file's bytes, when it is there and is the one the manifest names (an emptied or replaced file
    is refused)."""
    path = models_dir / file
    try:
        content = _read(path)
        actual = hashlib.sha256(content).hexdigest()
    except FileNotFoundError:
        raise ReloadError(what, f"{path} is missing") from None
    except OSError as err:
        raise ReloadError(what, f"{path} cannot be read: {err.strerror or err}") from None
    if actual != sha256:
        raise ReloadError(what, f"{path} is not the file the manifest names (sha256 {actual[:12]}..., the manifest "
                                f"says {sha256[:12]}...)")
    return content


def decided_set(loader: Loader, sizes: tuple[int, ...] = (1,)) -> ModelSet:
    """Start-up's set in one blocking call, for tools and tests: decided (gated), opened and warmed."""
    lifecycle = Lifecycle(loader.settings, loader.plan)  # its copies live until the sessions are open
    decision = lifecycle.decide(strict=False)
    return prepare(None, decision, sizes, loader, strict=False).models
