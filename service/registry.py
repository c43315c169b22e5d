"""The loaded models: one ONNX Runtime session per manifest entry that passes its checks.

Startup reads the manifest through the same pydantic model the export writes, verifies each file's
sha256 and opens a session on the best provider. A model that fails a check is logged with the reason
and left out; the others serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import Settings
from service.manifest import ENDPOINTS, Manifest, ManifestError, ModelEntry, load_manifest, sha256_of
from service.providers import CPU, choose_providers, nvidia_driver_present

log = logging.getLogger("digitgen.registry")


class ModelFileError(Exception):
    """A model left out at startup; the message says why."""


class ReloadError(Exception):
    """A reload that cannot complete: `what` is the model (or "manifest") that failed, `reason` why."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what, self.reason = what, reason


@dataclass
class LoadedModel:
    entry: ModelEntry
    session: ort.InferenceSession
    provider: str
    warmed: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    def run(self, z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """images [N, 1, 28, 28] in [0, 1] for z [N, latent] (and y [N, classes]); blocking: call it off the loop."""
        feed = {"z": z} if y is None else {"z": z, "y": y}
        return self.session.run(["image"], feed)[0]

    def warm(self, batch_sizes: tuple[int, ...]) -> None:
        """Run every batch size we will serve once, so no request pays for first-run allocation."""
        for n in batch_sizes:
            z = np.zeros((n, self.entry.latent_dim), np.float32)
            y = np.full((n, self.entry.num_classes), 1 / max(self.entry.num_classes, 1), np.float32) \
                if self.entry.conditional else None
            out = self.run(z, y)
            if out.shape != (n, *self.entry.image_shape):
                raise ModelFileError(f"{self.name}: output shape {out.shape}, expected {(n, *self.entry.image_shape)}")
        self.warmed = True


def _check_interface(session: ort.InferenceSession, entry: ModelEntry) -> None:
    """The ONNX interface of issue 3: z [N, latent_dim], y [N, num_classes] when conditional, image out."""
    inputs = {i.name: i for i in session.get_inputs()}
    expected = {"z": entry.latent_dim} | ({"y": entry.num_classes} if entry.conditional else {})
    if set(inputs) != set(expected):
        raise ModelFileError(f"inputs are {sorted(inputs)}, the manifest implies {sorted(expected)}")
    for name, width in expected.items():
        if inputs[name].type != "tensor(float)" or inputs[name].shape[1:] != [width]:
            raise ModelFileError(f"input {name} is {inputs[name].type} {inputs[name].shape}, expected float [N, {width}]")
    if [o.name for o in session.get_outputs()] != ["image"]:
        raise ModelFileError(f"outputs are {[o.name for o in session.get_outputs()]}, expected ['image']")


class Registry:
    """Models by name and the manifest's defaults, restricted to the models that loaded."""

    def __init__(self, manifest: Manifest, models: dict[str, LoadedModel], failures: dict[str, str]):
        self.manifest, self.models, self.failures = manifest, models, failures

    @classmethod
    def load(cls, settings: Settings) -> Registry:
        manifest = load_manifest(settings.models_dir)  # ManifestError: nothing to serve, startup stops
        providers = choose_providers(settings.providers, ort.get_available_providers(), nvidia_driver_present())
        models, failures = {}, {}
        for entry in manifest.models:
            try:
                models[entry.name] = _open(entry, Path(settings.models_dir), providers, settings)
            except ModelFileError as err:
                failures[entry.name] = str(err)
                log.error("model %s left out: %s", entry.name, err)
        return cls(manifest, models, failures)

    def successor(self, settings: Settings, warm_sizes: tuple[int, ...]) -> Registry:
        """The registry the manifest describes now, for a reload: models whose entry is unchanged are
        this registry's own (their sessions and batchers carry on); new or changed ones are opened,
        checked and warmed here. Blocking (call it off the event loop). A manifest, or any model of it,
        that fails raises ReloadError: the caller keeps this registry."""
        try:
            manifest = load_manifest(settings.models_dir)
        except ManifestError as err:
            raise ReloadError("manifest", str(err)) from None
        providers = choose_providers(settings.providers, ort.get_available_providers(), nvidia_driver_present(),
                                     quiet=True)
        models = {}
        for entry in manifest.models:
            current = self.models.get(entry.name)
            if current is not None and current.entry == entry:
                models[entry.name] = current
                continue
            try:
                model = _open(entry, Path(settings.models_dir), providers, settings)
                model.warm(warm_sizes)
            except ModelFileError as err:
                raise ReloadError(entry.name, str(err)) from None
            except Exception as err:  # a file that loads but cannot run
                raise ReloadError(entry.name, f"warm-up failed: {err}") from None
            models[entry.name] = model
        if not models:
            raise ReloadError("manifest", "it lists no models")
        return Registry(manifest, models, {})

    def unavailable(self, name: str) -> str:
        """Why `name` is not served and what is, for every route's 404: " (left out ...); available: ..." """
        why = f" (left out at startup: {self.failures[name]})" if name in self.failures else ""
        return f"{why}; available: {', '.join(self.models) or 'none'}"

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.warmed for m in self.models.values())

    def default(self, endpoint: str) -> str | None:
        """The manifest's default for an endpoint when it loaded, else the first loaded model that fits."""
        name = getattr(self.manifest.defaults, endpoint)
        if name in self.models:
            return name
        fits = [m.name for m in self.models.values() if endpoint != "generate" or m.entry.conditional]
        return fits[0] if fits else None

    def defaults_of(self, name: str) -> list[str]:
        return [e for e in ENDPOINTS if self.default(e) == name]


def _open(entry: ModelEntry, models_dir: Path, providers: list, settings: Settings) -> LoadedModel:
    path = models_dir / entry.file
    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise ModelFileError(f"{path} has sha256 {actual[:12]}..., the manifest says {entry.sha256[:12]}...")
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # ONNX Runtime's own warnings would repeat what we log
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # ONNX Runtime raises its own types for corrupt files
        raise ModelFileError(f"{path} does not load in ONNX Runtime: {str(err).strip()[:200]}") from None
    _check_interface(session, entry)
    provider = session.get_providers()[0]
    if providers[0] != CPU and provider == CPU:
        log.warning("model %s: CUDA was requested but ONNX Runtime fell back to the CPU "
                    "(CUDA or cuDNN libraries missing?)", entry.name)
    log.info("model %s loaded from %s on %s", entry.name, path, provider)
    return LoadedModel(entry, session, provider)
