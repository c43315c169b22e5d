"""How good is a generator? A calibrated digit classifier (the evaluator) judges its samples.

One evaluator per kind of data (digits, fashion), trained once on the kind's full training set (MNIST's
60,000 digits for every digit model, whatever data the model itself saw), calibrated by temperature
scaling on held-out training digits, and cached. Every figure comes beside the same figure for real test
digits, so a model is read against what real data scores with the same judge. Its 128-wide feature layer
(before the logits) is the space for FID and precision/recall, as advised for MNIST instead of Inception
features. The same code scores a PyTorch run and an exported ONNX file: both are a `Source` that turns z
(and y) into images.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import atomic_path, write_text_atomic
from training.data import DigitData, Split, load_dataset

FEATURES = 128
CONFIDENT = 0.9        # "confidence" is the share of samples classified with probability above this
PR_NEIGHBOURS = 3      # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
EVAL_SEED = 1234       # the z every evaluation draws, so two models are scored on the same noise
DEFAULT_SAMPLES = 10_000
DEFAULT_CACHE = Path("runs/evaluators")
EVALUATOR_VERSION = 3  # part of the cache file's name: a changed network or recipe is trained anew
# The kind of data each dataset holds, and the dataset that trains that kind's evaluator.
KINDS = {"mnist-5k": "digits", "mnist": "digits", "fashion-mnist": "fashion"}
EVALUATOR_DATASETS = {"digits": "mnist", "fashion": "fashion-mnist"}
ECE_BINS = 15


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


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their counts (Guo et
    al. 2017): 0 for a classifier whose "90% sure" is right 90% of the time."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    which = (confidence * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.float().sum().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return total / len(labels)


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
            confidence, shares = _class_figures(probs, len(self.report["class_names"]))
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


def _class_figures(probs: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """(share classified with probability above CONFIDENT, share of each predicted class)."""
    predicted = probs.argmax(1)
    shares = (predicted.bincount(minlength=num_classes).float() / len(predicted)).tolist()
    return float((probs.max(1).values > CONFIDENT).float().mean()), shares


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


def train_evaluator(data: DigitData, epochs: int = 8, holdout: int = 5000, seed: int = 0,
                    mixup: float = 0.4, log=print) -> tuple[Evaluator, float, dict]:
    """Train on the training split less `holdout` digits, fit the temperature on those, and report
    accuracy and expected calibration error on the test split: (network, temperature, report)."""
    from training.trainers import native_bf16

    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    held = calibration_holdout(data.train.labels, holdout, seed)
    x, y = data.train.images.cpu()[~held], data.train.labels.cpu()[~held]
    net = Evaluator(data.num_classes).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(x) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    # bf16 where the CPU runs it natively: twice the images/s of float32 here; scoring runs in float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16(torch.device("cpu")))
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=generator).split(128):
            batch, target = _augment(x[idx], generator), y[idx]
            if mixup:
                batch, target = _mixup(batch, target, mixup, data.num_classes, generator)
            with autocast:
                logits = net(batch.contiguous(memory_format=torch.channels_last))[1]
            loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        log(f"evaluator epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    net = net.to(memory_format=torch.contiguous_format).eval()
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


def save_judge(path: Path, net: Evaluator, temperature: float, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"net": net.state_dict(), "temperature": temperature, "report": report}, tmp)


def _floor_digits(train: Split, n: int) -> Split:
    """A fixed sample of n training digits: the "generator" that draws real data."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(EVAL_SEED))[:n]
    return Split(train.images[idx].cpu(), train.labels[idx].cpu())


# --- distances in feature space ------------------------------------------------------------------

def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets [N, D]: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^(1/2))."""
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr (Sa Sb)^(1/2) = sum of sqrt(eig(Sa^(1/2) Sb Sa^(1/2))), a symmetric PSD matrix
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def _within_manifold(points: torch.Tensor, support: torch.Tensor, k: int, chunk: int = 2000) -> torch.Tensor:
    """For each point: is it inside some support sample's ball of radius (distance to its k-th NN)?
    In row chunks, so 10,000 x 10,000 distances never sit in memory at once."""
    radii = torch.cat([torch.cdist(part, support).kthvalue(k + 1, dim=1).values  # k+1: the nearest is itself
                       for part in support.split(chunk)])
    return torch.cat([(torch.cdist(part, support) <= radii[None, :]).any(dim=1) for part in points.split(chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Precision: share of fakes on the real manifold; recall: share of reals on the fake manifold."""
    precision = _within_manifold(fake, real, k).float().mean().item()
    recall = _within_manifold(real, fake, k).float().mean().item()
    return precision, recall


# --- scoring a generator -------------------------------------------------------------------------

@dataclass
class Source:
    """Anything that draws images: `draw(z [N, latent], y [N, classes] or None) -> [N, 1, 28, 28]` in [0, 1]."""
    name: str
    latent_dim: int
    num_classes: int  # 0: unconditional
    draw: Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def onnx_source(path: Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Source:
    """An exported file as a Source; its interface (z, optional y) is read from the graph."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=list(providers))
    except Exception as err:  # onnxruntime raises its own exception types for unreadable files
        raise EvaluationError(f"{path}: not a loadable ONNX model ({err})") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if "z" not in inputs:
        raise EvaluationError(f"{path}: no input named z (inputs: {', '.join(inputs)})")

    def draw(z, y):
        feed = {"z": z} if y is None else {"z": z, "y": y}
        return session.run(["image"], feed)[0]
    return Source(Path(path).stem, int(inputs["z"][1]), int(inputs["y"][1]) if "y" in inputs else 0, draw)


def torch_source(name: str, net: nn.Module, num_classes: int) -> Source:
    """A network with `generate(z, y)` in eval mode, as a Source."""
    net.eval()

    @torch.no_grad()
    def draw(z, y):
        return net.generate(torch.from_numpy(z), None if y is None else torch.from_numpy(y)).float().numpy()
    return Source(name, net.latent_dim, num_classes, draw)


def evaluation_inputs(latent_dim: int, num_classes: int, n: int, seed: int = EVAL_SEED, truncation: float = 1.0):
    """The z [N, latent] every evaluation uses (scaled by `truncation`, as the service does) and, for
    conditional models, labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent_dim), dtype=np.float32) * np.float32(truncation)
    labels = np.arange(n) % max(num_classes, 1)
    y = np.eye(num_classes, dtype=np.float32)[labels] if num_classes else None
    return z, labels, y


def draw_all(source: Source, z: np.ndarray, y: np.ndarray | None, batch: int = 500) -> np.ndarray:
    parts = [source.draw(z[i:i + batch], None if y is None else y[i:i + batch]) for i in range(0, len(z), batch)]
    return np.concatenate(parts).astype(np.float32)


def score_images(judge: Judge, images, labels=None) -> dict:
    """The judge's figures for `images` ([N, 1, 28, 28] in [0, 1]), each beside real digits' figure."""
    feats, probs = judge.predict(images)
    ref_feats, _ = judge.reference_predictions()
    confidence, shares = _class_figures(probs, probs.shape[1])
    m = min(len(feats), len(ref_feats))  # precision/recall on equal-sized sets, as in the paper
    precision, recall = precision_recall(ref_feats[:m], feats[:m])
    metrics = {
        "samples": len(feats),
        "class_shares": [round(s, 4) for s in shares],
        "min_class_share": min(shares),
        "max_class_share": max(shares),
        "confidence": confidence,
        "fid": frechet_distance(feats, ref_feats),
        "precision": precision,
        "recall": recall,
    }
    if labels is not None:
        metrics["conditional_accuracy"] = float((probs.argmax(1) == torch.as_tensor(labels)).float().mean())
    real = judge.real_figures(len(feats))
    metrics.update(real)
    metrics["confidence_ratio"] = confidence / real["real_confidence"]
    metrics["fid_ratio"] = metrics["fid"] / real["fid_floor"]
    metrics["precision_ratio"] = precision / real["precision_floor"]
    metrics["recall_ratio"] = recall / real["recall_floor"]
    metrics["evaluator_accuracy"] = judge.report["test_accuracy"]
    metrics["evaluator_ece"] = judge.report["test_ece"]
    return metrics


def evaluate_source(source: Source, judge: Judge, n: int = DEFAULT_SAMPLES, truncation: float = 1.0) -> dict:
    """Every figure for one generator against the judge's reference digits, beside real digits' own."""
    z, labels, y = evaluation_inputs(source.latent_dim, source.num_classes, n, truncation=truncation)
    images = draw_all(source, z, y)
    if not np.isfinite(images).all():
        raise EvaluationError(f"{source.name}: the generator produced non-finite pixels")
    metrics = score_images(judge, images, labels if source.num_classes else None)
    if truncation != 1.0:
        metrics["truncation"] = truncation
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


TRUNCATIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def truncation_sweep(source: Source, judge: Judge, values=TRUNCATIONS, n: int = DEFAULT_SAMPLES) -> list[dict]:
    """The figures at each truncation t: how fidelity (confidence, FID) trades against diversity (recall)."""
    return [{**evaluate_source(source, judge, n, t), "truncation": t} for t in values]


def judge_for_run(config, data_dir: str | Path | None = None, cache_dir: Path | None = None, log=print) -> Judge:
    """The judge of a run: its kind's evaluator. The run's own --data-dir locates the evaluator's data
    when the run trained on that dataset; `data_dir` overrides it."""
    if data_dir is None and config.dataset == evaluator_dataset(config.dataset):
        data_dir = config.data_dir
    return load_judge(config.dataset, data_dir, cache_dir, log=log)


def evaluate_run(trainer, source: Source, judge: Judge, n: int = DEFAULT_SAMPLES, truncation: float = 1.0) -> dict:
    """`evaluate_source`, plus a VAE's validation ELBO on its own dataset, which needs the encoder and
    so only a run can give. `source` may be the run's network or its exported file."""
    config = trainer.config
    metrics = evaluate_source(source, judge, n, truncation)
    if hasattr(trainer, "validate"):
        data = load_dataset(config.dataset, config.data_dir, limit=config.limit)
        val = trainer.validate(data.val.images, data.val.labels)
        metrics.update({"val_elbo": round(-val["val_loss"], 4), "val_recon": round(val["val_recon"], 4)})
    return metrics


ROWS = [  # (key, real digits' key, label, format) for the printed table
    ("conditional_accuracy", "evaluator_accuracy", "conditional accuracy", "{:.4f}"),
    ("min_class_share", "real_min_class_share", "smallest class share", "{:.3f}"),
    ("max_class_share", "real_max_class_share", "largest class share", "{:.3f}"),
    ("confidence", "real_confidence", f"confidence (p > {CONFIDENT})", "{:.4f}"),
    ("fid", "fid_floor", "FID (evaluator features)", "{:.3f}"),
    ("precision", "precision_floor", f"precision (k={PR_NEIGHBOURS})", "{:.3f}"),
    ("recall", "recall_floor", f"recall (k={PR_NEIGHBOURS})", "{:.3f}"),
    ("val_elbo", None, "validation ELBO (nats/image)", "{:.2f}"),
]
RATIOS = {"confidence": "confidence_ratio", "fid": "fid_ratio", "precision": "precision_ratio",
          "recall": "recall_ratio"}


def format_table(name: str, metrics: dict) -> str:
    """The model's figures beside real test digits' (FID, precision and recall: real training digits
    against the test digits, the floor), and their ratio."""
    lines = [f"| {name} | value | real digits | ratio |", "|---|---:|---:|---:|"]
    for key, real_key, label, fmt in ROWS:
        if metrics.get(key) is None:
            continue
        real = fmt.format(metrics[real_key]) if real_key and metrics.get(real_key) is not None else ""
        ratio = f"{metrics[RATIOS[key]]:.2f}x" if key in RATIOS else ""
        lines.append(f"| {label} | {fmt.format(metrics[key])} | {real} | {ratio} |")
    lines.append(f"| samples | {metrics['samples']} | | |")
    lines.append(f"| evaluator: test accuracy {metrics['evaluator_accuracy']:.4f}, ECE {metrics['evaluator_ece']:.4f} | | | |")
    return "\n".join(lines)


def write_metrics(path: Path, metrics: dict) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
