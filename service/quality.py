"""The judge travels with the models: the quality gate a model passes before it is served (the judge's
live figure of what each model serves is service/live_quality.py).

A judge is a calibrated classifier of one kind of data (the digits evaluator of training/evaluator.py,
its temperature folded into the graph), listed in the manifest and opened like a model (sha256 checked,
ONNX Runtime, no torch): `image` [N, 1, 28, 28] in [0, 1] in, `probabilities` [N, classes] out.

The gate, at start-up and at every reload, once a model is warmed: draw the first GATE_SAMPLES of the
seeded inputs its manifest figures were measured on (`QualityFigures`), score the images with its judge,
and compare confidence, smallest class share and conditional accuracy with the recorded figures. Each
is a proportion, so a figure p recorded over many samples, measured again over n, falls short by more
than GATE_Z binomial standard errors sqrt(p (1 - p) / n) about once in 30,000 (plus 1 / n: one sample's
worth, so a figure recorded as 0 or 1 is not refused for one sample). Lower than that, and the model is
refused with the figure named.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnxruntime as ort

from service import admission
from service.manifest import JudgeEntry, Manifest, ModelEntry, QualityFigures
from service.runtime.model import ModelRuntime
from service.runtime.session import ModelFileError, open_onnx
from service.sampling import latents, one_hot

log = logging.getLogger("digitgen.quality")

GATE_SAMPLES = 1000  # figures within 0.015 (sd) for about 0.5 s a model: tests/benchmarks/quality_gate.py
GATE_BATCH = 64  # images per model and judge call while gating: no larger than a served batch, so no arena grows
GATE_Z = 4.0         # standard errors a figure may fall short by: a one-sided normal tail of 3e-5
FIGURES = admission.FIGURES


@dataclass(frozen=True)
class Judge:
    entry: JudgeEntry
    session: ort.InferenceSession

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities [N, classes] of images [N, 1, 28, 28] in [0, 1]."""
        return self.session.run(["probabilities"], {"image": images})[0]


@dataclass(frozen=True)
class Judges:
    """The manifest's judges that opened, and why the others did not."""
    loaded: Mapping[str, Judge] = field(default_factory=lambda: MappingProxyType({}))
    failed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


NO_JUDGES = Judges()


def open_judge(entry: JudgeEntry, models_dir: Path, providers: list, threads: int, path: Path | None = None) -> Judge:
    """The judge's session after its checksum and interface; ModelFileError when either fails. `path`:
    the checked copy to read instead of the models folder's file."""
    path = path or models_dir / entry.file
    session = open_onnx(path, entry.sha256, providers, threads)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [(i.name, i.type, i.shape[1:]) for i in inputs] != [("image", "tensor(float)", list(entry.image_shape))]:
        raise ModelFileError(f"{path}: inputs are {[(i.name, i.type, i.shape) for i in inputs]}, "
                             f"expected image float [N, {', '.join(map(str, entry.image_shape))}]")
    if [(o.name, o.shape[1:]) for o in outputs] != [("probabilities", [len(entry.class_names)])]:
        raise ModelFileError(f"{path}: outputs are {[(o.name, o.shape) for o in outputs]}, "
                             f"expected probabilities [N, {len(entry.class_names)}]")
    log.info("judge %s (%s) loaded from %s on %s", entry.name, entry.kind, path, session.get_providers()[0])
    return Judge(entry, session)


def open_judges(manifest: Manifest, models_dir: Path, providers: list, threads: int,
                kept: Judges = NO_JUDGES, files: Mapping[str, str] | None = None) -> Judges:
    """Every judge of the manifest: those of `kept` whose entry is unchanged carry on, the rest are opened."""
    loaded, failed = {}, {}
    for entry in manifest.judges:
        old = kept.loaded.get(entry.name)
        if old is not None and old.entry == entry:
            loaded[entry.name] = old
            continue
        try:
            copy = (files or {}).get(entry.sha256)
            loaded[entry.name] = open_judge(entry, models_dir, providers, threads, Path(copy) if copy else None)
        except ModelFileError as err:
            failed[entry.name] = str(err)
            log.error("judge %s not loaded: %s", entry.name, err)
    return Judges(MappingProxyType(loaded), MappingProxyType(failed))


# --- the gate ------------------------------------------------------------------------------------

def seeded_inputs(entry: ModelEntry, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(z [n, latent], y [n, classes] or None, labels [n] or None): the inputs the recorded figures were
    measured on (training/evaluate.py: evaluation_inputs), the classes 0..9 in turn."""
    z = latents(seed, n, entry.latent_dim)
    if not entry.conditional:
        return z, None, None
    labels = np.arange(n) % entry.num_classes
    return z, one_hot(labels, entry.num_classes), labels


def figures(probabilities: np.ndarray, labels: np.ndarray | None, confident: float) -> dict[str, float]:
    """Confidence (share above `confident`), smallest class share and, with labels, conditional accuracy."""
    predicted = probabilities.argmax(1)
    shares = np.bincount(predicted, minlength=probabilities.shape[1]) / len(predicted)
    measured = {"confidence": float((probabilities.max(1) > confident).mean()),
                "min_class_share": float(shares.min())}
    if labels is not None:
        measured["conditional_accuracy"] = float((predicted == labels).mean())
    return measured


def tolerance(recorded: float, n: int) -> float:
    """How far below a recorded proportion a figure measured over n samples may fall."""
    return GATE_Z * math.sqrt(recorded * (1 - recorded) / n) + 1 / n


@dataclass(frozen=True)
class Measured:
    """What the gate measured of one file with one judge: it depends on nothing else (service/gate_cache.py)."""
    samples: int
    figures: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class GateResult:
    """A measurement held against the entry's recorded figures and its kind's floors (service/admission.py).
    Plain dicts: a result crosses from the supervisor to the workers."""
    samples: int
    measured: dict[str, float]
    lowest: dict[str, float]  # the least each figure may be: recorded - tolerance, and never below its floor
    seconds: float
    floors: dict[str, float] = field(default_factory=dict)

    @property
    def shortfalls(self) -> list[str]:
        return [f"{key} {self.measured[key]:.4f} over {self.samples} samples, below the {self.lowest[key]:.4f} "
                + ("the floor for its kind of model allows" if self.floors.get(key) == self.lowest[key]
                   else f"its recorded {key} allows")
                for key in self.lowest if self.measured[key] < self.lowest[key]]

    def describe(self) -> dict:
        return {"samples": self.samples, "measured": dict(self.measured),
                "lowest_allowed": {key: round(value, 4) for key, value in self.lowest.items()},
                "seconds": round(self.seconds, 3)}


def measure(model: ModelRuntime, judge: Judge, recorded: QualityFigures, samples: int = GATE_SAMPLES) -> Measured:
    """Draw the first `samples` of the recorded figures' inputs through the model and score them."""
    started = time.perf_counter()
    n = min(samples, recorded.samples)
    z, y, labels = seeded_inputs(model.entry, n, recorded.seed)
    probabilities = np.concatenate([
        judge.probabilities(model.run(z[i:i + GATE_BATCH], None if y is None else y[i:i + GATE_BATCH]))
        for i in range(0, n, GATE_BATCH)])
    return Measured(n, figures(probabilities, labels, judge.entry.confident), time.perf_counter() - started)


def judged(entry: ModelEntry, judge: JudgeEntry, measured: Measured) -> GateResult:
    """The measurement against the entry's recorded figures and the floors of its kind."""
    recorded, n = entry.quality, measured.samples
    assert recorded is not None
    least = admission.floors(entry, len(judge.class_names))
    lowest = {key: max(getattr(recorded, key) - tolerance(getattr(recorded, key), n), least.get(key, 0.0))
              for key in FIGURES if getattr(recorded, key) is not None and key in measured.figures}
    return GateResult(n, dict(measured.figures), lowest, measured.seconds, least)


def gate(model: ModelRuntime, judge: Judge, recorded: QualityFigures, samples: int = GATE_SAMPLES) -> GateResult:
    """Measure the model and hold it against its figures (`recorded`) and its floors."""
    entry = model.entry.model_copy(update={"quality": recorded})
    return judged(entry, judge.entry, measure(model, judge, recorded, samples))
