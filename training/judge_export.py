"""The judge travels with the models: a kind's evaluator exported to ONNX beside them (its temperature
folded into the graph), listed in the manifest, and each model's figures measured with that very file,
which the service's quality gate (service/quality.py) checks before it serves the model.

The ONNX interface of a judge:
  input  image          float32 [N, 1, 28, 28]   intensity in [0, 1], as the models draw
  output probabilities  float32 [N, classes]     softmax(logits / T): the calibrated probabilities
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.manifest import JudgeEntry, Manifest, ModelEntry, QualityFigures, sha256_of
from training import evaluate
from training.evaluator import EVAL_SEED, EVALUATOR_VERSION, KINDS, Judge
from training.metrics import CONFIDENT, class_figures
from training.onnx_export import EXAMPLE_BATCH, PARITY_SAMPLES, export_checked

PARITY_TOLERANCE = 1e-5  # max absolute difference of a probability, ONNX Runtime CPU vs PyTorch
REPORTED = ("trained_on", "test_digits", "epochs", "mixup", "test_accuracy", "test_ece", "temperature")


class _Calibrated(nn.Module):
    """The exported graph: the evaluator's logits over its temperature, as probabilities."""

    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (self.net(image)[1] / self.temperature).softmax(1)  # [N, classes]


def export_judge(judge: Judge, kind: str, out_dir: Path) -> JudgeEntry:
    """Write OUT_DIR/judge-KIND.onnx after the parity check (on real digits of the judge's reference set)
    and return its manifest entry."""
    path = out_dir / f"judge-{kind}.onnx"
    # The ignore: Module.to takes memory_format=, which the overloads in its stub omit
    module = _Calibrated(copy.deepcopy(judge.net).float().to("cpu", memory_format=torch.contiguous_format).eval(),  # type: ignore[call-overload]
                         judge.temperature).eval()
    example = (torch.rand(EXAMPLE_BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(0)),)
    check = (judge.reference.images[:PARITY_SAMPLES].float().cpu(),)
    opset = export_checked(module, example, ["image"], "probabilities", path, check, PARITY_TOLERANCE)
    report = {key: round(v, 6) if isinstance(v := judge.report[key], float) else v
              for key in REPORTED if key in judge.report}
    return JudgeEntry(name=kind, kind=kind, datasets=sorted(d for d, k in KINDS.items() if k == kind),
                      file=path.name, sha256=sha256_of(path), opset=opset, class_names=judge.report["class_names"],
                      confident=CONFIDENT, report=report | {"evaluator_version": EVALUATOR_VERSION})


def measure(models_dir: Path, entry: ModelEntry, judge: JudgeEntry, samples: int = evaluate.DEFAULT_SAMPLES
            ) -> QualityFigures:
    """The model file's figures by the judge's file, over the evaluation's seeded draws (the inputs the
    gate draws a prefix of)."""
    source = evaluate.onnx_source(models_dir / entry.file)
    z, labels, y = evaluate.evaluation_inputs(entry.latent_dim, entry.num_classes, samples)
    images = evaluate.draw_all(source, z, y)
    session = ort.InferenceSession(str(models_dir / judge.file), providers=["CPUExecutionProvider"])
    probs = torch.from_numpy(np.concatenate([session.run(["probabilities"], {"image": images[i:i + 1000]})[0]
                                             for i in range(0, len(images), 1000)]))
    confidence, shares = class_figures(probs, probs.shape[1])
    accuracy = float((probs.argmax(1) == torch.from_numpy(labels)).double().mean()) if entry.conditional else None
    return QualityFigures(judge=judge.name, judge_sha256=judge.sha256, samples=samples, seed=EVAL_SEED,
                          confidence=round(confidence, 6), min_class_share=round(min(shares), 6),
                          conditional_accuracy=None if accuracy is None else round(accuracy, 6))


def with_quality(manifest: Manifest, models_dir: Path, judge: Judge, kind: str, names: list[str] | None = None,
                 samples: int = evaluate.DEFAULT_SAMPLES, renew: bool = False, log=print,
                 also: tuple[str, ...] = ()) -> Manifest:
    """The manifest with the kind's judge listed and the named models (default: all it judges) measured
    with it, and the versions keyed in `also` (name@version: a canary, a version for pinned requests).
    The judge is exported when it is not listed yet or `renew` is set; a new judge file is then
    measured against every model it judges, whose figures from the old file no longer hold."""
    listed = next((j for j in manifest.judges if j.name == kind), None)
    fresh = renew or listed is None or not (path := models_dir / listed.file).is_file() or sha256_of(path) != listed.sha256
    if fresh:
        listed = export_judge(judge, kind, models_dir)
        log(f"{models_dir / listed.file}: the {kind} judge, parity with PyTorch within {PARITY_TOLERANCE:g} "
            f"over {PARITY_SAMPLES} digits")
    assert listed is not None  # the listed judge, or the one exported just now
    judged = [m for m in manifest.models  # a new judge: every version; else the named models' served versions
              if m.dataset in listed.datasets and (fresh or names is None or m.key in also or
                                                   (m.name in names and manifest.model(m.name).key == m.key))]
    measured = []
    for entry in judged:
        figures = measure(models_dir, entry, listed, samples)
        log(f"{entry.name}: quality by judge {listed.name} over {samples} samples: confidence "
            f"{figures.confidence:.4f}, smallest class share {figures.min_class_share:.4f}" + (
                f", conditional accuracy {figures.conditional_accuracy:.4f}" if entry.conditional else ""))
        measured.append(entry.model_copy(update={"quality": figures}))
    return manifest.upsert_judge(listed, measured)
