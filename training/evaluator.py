"""The judge of generated images: a digit classifier (the evaluator), its training, its calibration and
its cache.

One evaluator per kind of data (digits, fashion), trained once on the kind's full training set (MNIST's
60,000 digits for every digit model, whatever data the model itself saw), calibrated by temperature
scaling on held-out training digits, and cached. Its 128-wide feature layer (before the logits) is the
space for FID and precision/recall, as advised for MNIST instead of Inception features. A `Judge` is that
network with the real digits every sample set is compared against.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import precision
from training.atomic import atomic_path
from training.data import DigitData, Split, load_dataset
from training.metrics import class_figures, expected_calibration_error, frechet_distance, precision_recall

FEATURES = 128
EVAL_SEED = 1234       # the seed of every evaluation's draws, so two models are scored on the same noise
DEFAULT_CACHE = Path("runs/evaluators")
EVALUATOR_VERSION = 3  # part of the cache file's name: a changed network or recipe is trained anew
# The kind of data each dataset holds, and the dataset that trains that kind's evaluator.
KINDS = {"mnist-5k": "digits", "mnist": "digits", "fashion-mnist": "fashion"}
EVALUATOR_DATASETS = {"digits": "mnist", "fashion": "fashion-mnist"}


class EvaluationError(ValueError):
    """A file that cannot be evaluated or samples that cannot be scored; the message names it."""


class Evaluator(nn.Module):
    """Conv 28 -> 14 -> 7 (strided), a 128-wide feature layer, 10 logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),   # [N, 64, 14, 14]
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),  # [N, 128, 7, 7]
            nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(128 * 49, FEATURES), nn.ReLU(),                                     # [N, 128]
        )
        self.head = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 128], logits [N, classes]) of images in [0, 1]."""
        features = self.body(x)
        return features, self.head(features)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: rotate up to 10 degrees, scale 0.9-1.1, shift up to 2 pixels."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)  # 2 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, num_classes: int, generator: torch.Generator):
    """Blend each image with another of the batch, weight ~ Beta(alpha, alpha), and its label likewise
    (Zhang et al. 2018). An evaluator taught that half a 4 over half a 9 is half of each is not sure of
    in-between strokes, exactly where generators fail; it also calibrates (Thulasidasan et al. 2019)."""
    weight = torch.distributions.Beta(alpha, alpha).sample((len(x),)).clamp(0, 1)  # [N]
    other = torch.randperm(len(x), generator=generator)
    soft = F.one_hot(y, num_classes).float()
    w = weight[:, None]
    return (w[:, :, None, None] * x + (1 - w[:, :, None, None]) * x[other],
            w * soft + (1 - w) * soft[other])


@torch.no_grad()
def _logits_and_features(net: Evaluator, images: torch.Tensor | np.ndarray, batch: int = 1000):
    """(features [N, 128], logits [N, classes]) in float32, the network in eval mode."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    net.eval()
    feats, logits = [], []
    for chunk in images.float().split(batch):
        f, out = net(chunk)
        feats.append(f)
        logits.append(out)
    return torch.cat(feats), torch.cat(logits)


# --- calibration ---------------------------------------------------------------------------------

def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the negative log-likelihood of softmax(logits / T): a grid over 0.25..8, fine
    enough (0.9% steps) and free of an optimiser's starting point."""
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 400))
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[nll.argmin()])


def calibration_holdout(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """A fixed boolean mask of `size` training digits (about as many per class) kept out of training,
    on which the temperature is fitted."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[order[:size]] = True
    return mask


# --- training ------------------------------------------------------------------------------------

def _fit(net: Evaluator, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, mixup: float,
         generator: torch.Generator, log) -> None:
    """Adam with a one-cycle schedule over augmented (and mixed-up) batches of 128."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(x) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    # bf16 where the CPU runs it natively: twice the images/s of float32 here; scoring runs in float32
    autocast = precision.autocast(torch.device("cpu"))
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=generator).split(128):
            batch, target = _augment(x[idx], generator), y[idx]
            if mixup:
                batch, target = _mixup(batch, target, mixup, num_classes, generator)
            with autocast:
                logits = net(batch.contiguous(memory_format=torch.channels_last))[1]
            loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        log(f"evaluator epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")


def train_evaluator(data: DigitData, epochs: int = 8, holdout: int = 5000, seed: int = 0,
                    mixup: float = 0.4, log=print) -> tuple[Evaluator, float, dict]:
    """Train on the training split less `holdout` digits, fit the temperature on those, and report
    accuracy and expected calibration error on the test split: (network, temperature, report)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    held = calibration_holdout(data.train.labels, holdout, seed)
    x, y = data.train.images.cpu()[~held], data.train.labels.cpu()[~held]
    # The ignores: Module.to takes memory_format=, which the overloads in its stub omit
    net: Evaluator = Evaluator(data.num_classes).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _fit(net, x, y, data.num_classes, epochs, mixup, generator, log)
    net = net.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    temperature = fit_temperature(_logits_and_features(net, data.train.images.cpu()[held])[1],
                                  data.train.labels.cpu()[held]) if holdout else 1.0
    _, test_logits = _logits_and_features(net, data.val.images.cpu())
    test_labels = data.val.labels.cpu()
    report = {
        "trained_on": data.name, "train_digits": len(x), "calibration_digits": int(held.sum()),
        "test_digits": len(test_labels), "epochs": epochs, "mixup": mixup,
        "seconds": round(time.perf_counter() - started, 1),
        "test_accuracy": float((test_logits.argmax(1) == test_labels).float().mean()),
        "temperature": temperature,
        "test_ece_uncalibrated": expected_calibration_error(test_logits.softmax(1), test_labels),
        "test_ece": expected_calibration_error((test_logits / temperature).softmax(1), test_labels),
        "test_nll_uncalibrated": float(F.cross_entropy(test_logits, test_labels)),
        "test_nll": float(F.cross_entropy(test_logits / temperature, test_labels)),
        "class_names": list(data.class_names),
    }
    log(f"evaluator: test accuracy {report['test_accuracy']:.4f}, temperature {temperature:.3f}, ECE "
        f"{report['test_ece_uncalibrated']:.4f} -> {report['test_ece']:.4f} ({len(test_labels)} test digits, "
        f"{epochs} epochs, {report['seconds']:.0f} s)")
    return net, temperature, report


# --- the judge and its cache ---------------------------------------------------------------------

@dataclass
class Judge:
    """A trained, calibrated evaluator with the real digits it compares samples against."""
    net: Evaluator
    temperature: float
    report: dict                  # test accuracy, ECE before/after calibration, how it was trained
    reference: Split              # the kind's test digits: every sample set is compared with these
    real: Split                   # training digits: "samples" of a perfect generator, for the floors
    _real_figures: dict = field(default_factory=dict, repr=False)
    _reference: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def reference_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, probabilities) of the reference digits, computed once per judge."""
        if self._reference is None:
            self._reference = self.predict(self.reference.images)
        return self._reference

    def predict(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, 128], calibrated class probabilities [N, classes]) of images in [0, 1]."""
        feats, logits = _logits_and_features(self.net, images)
        return feats, (logits / self.temperature).softmax(1)

    def real_figures(self, n: int) -> dict:
        """The figures of real digits at sample size n: confidence and class shares of the test digits;
        FID, precision and recall of n training digits against the test digits (the floors)."""
        if n not in self._real_figures:
            ref_feats, probs = self.reference_predictions()
            confidence, shares = class_figures(probs, len(self.report["class_names"]))
            m = min(n, len(self.real))
            real_feats, _ = self.predict(self.real.images[:m])
            precision, recall = precision_recall(ref_feats[:m], real_feats)
            self._real_figures[n] = {
                "real_confidence": confidence, "real_min_class_share": min(shares),
                "real_max_class_share": max(shares),
                "fid_floor": frechet_distance(real_feats, ref_feats),
                "precision_floor": precision, "recall_floor": recall,
            }
        return self._real_figures[n]


def evaluator_dataset(dataset: str) -> str:
    """The dataset whose evaluator judges models trained on `dataset`."""
    if dataset not in KINDS:
        raise EvaluationError(f"no evaluator for dataset {dataset!r}; known: {', '.join(KINDS)}")
    return EVALUATOR_DATASETS[KINDS[dataset]]


def load_judge(dataset: str, data_dir: str | Path | None = None, cache_dir: Path | None = None,
               log=print) -> Judge:
    """The judge of models trained on `dataset`: its kind's evaluator, trained once and kept in
    `cache_dir`, with that kind's test digits as the reference. `data_dir` locates the evaluator's
    dataset (the download path fetches it when missing)."""
    name = evaluator_dataset(dataset)
    data = load_dataset(name, data_dir)
    path = Path(cache_dir or DEFAULT_CACHE) / f"{KINDS[dataset]}-{name}-v{EVALUATOR_VERSION}.pt"
    net = Evaluator(data.num_classes)
    if path.exists():
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["net"])
        temperature, report = state["temperature"], state["report"]
    else:
        log(f"training the {KINDS[dataset]} evaluator on {name} (once; cached in {path})")
        net, temperature, report = train_evaluator(data, log=log)
        save_judge(path, net, temperature, report)
    real = _floor_digits(data.train, len(data.val))
    return Judge(net.eval(), temperature, report, data.val.to("cpu"), real)


def cached_report(dataset: str, cache_dir: Path | None = None) -> dict | None:
    """The cached evaluator's report (its accuracy and calibration), without its data; None when it is not
    trained yet."""
    name = evaluator_dataset(dataset)
    path = Path(cache_dir or DEFAULT_CACHE) / f"{KINDS[dataset]}-{name}-v{EVALUATOR_VERSION}.pt"
    return torch.load(path, weights_only=True)["report"] if path.exists() else None


def judge_for_run(config, data_dir: str | Path | None = None, cache_dir: Path | None = None, log=print) -> Judge:
    """The judge of a run: its kind's evaluator. The run's own --data-dir locates the evaluator's data
    when the run trained on that dataset; `data_dir` overrides it."""
    if data_dir is None and config.dataset == evaluator_dataset(config.dataset):
        data_dir = config.data_dir
    return load_judge(config.dataset, data_dir, cache_dir, log=log)


def save_judge(path: Path, net: Evaluator, temperature: float, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"net": net.state_dict(), "temperature": temperature, "report": report}, tmp)


def _floor_digits(train: Split, n: int) -> Split:
    """A fixed sample of n training digits: the "generator" that draws real data."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(EVAL_SEED))[:n]
    return Split(train.images[idx].cpu(), train.labels[idx].cpu())
