"""How good is a generator? A digit classifier trained on the real data judges its samples.

The evaluator is a small CNN trained on the dataset's training split with light augmentation; its
validation accuracy is reported beside every figure, since it bounds what the figures can say. Its
128-wide feature layer (before the logits) is the space for FID and precision/recall, as advised for
MNIST instead of Inception features. The same code scores a PyTorch run and an exported ONNX file:
both are a `Source` that turns z (and y) into images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import atomic_path, write_text_atomic
from training.data import DigitData, load_dataset

FEATURES = 128
CONFIDENT = 0.9        # "confidence" is the share of samples classified with probability above this
PR_NEIGHBOURS = 3      # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
EVAL_SEED = 1234       # the z every evaluation draws, so two models are scored on the same noise
DEFAULT_CACHE = Path("runs/evaluators")  # one trained evaluator per dataset


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


def train_evaluator(data: DigitData, epochs: int = 15, seed: int = 0, log=print) -> tuple[Evaluator, float]:
    """Train on the training split; returns the network (eval mode) and its validation accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = Evaluator(data.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(data.train) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    x, y = data.train.images.cpu(), data.train.labels.cpu()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=generator).split(128):
            loss = F.cross_entropy(net(_augment(x[idx], generator))[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    accuracy = float((predict(net, data.val.images.cpu())[1].argmax(1) == data.val.labels.cpu()).float().mean())
    log(f"evaluator: validation accuracy {accuracy:.4f} ({len(data.val)} digits, {epochs} epochs)")
    return net, accuracy


@torch.no_grad()
def predict(net: Evaluator, images: torch.Tensor | np.ndarray, batch: int = 1000):
    """(features, class probabilities) of images [N, 1, 28, 28] in [0, 1]."""
    images = torch.as_tensor(np.asarray(images, dtype=np.float32)) if isinstance(images, np.ndarray) else images
    feats, probs = [], []
    for chunk in images.float().split(batch):
        f, logits = net(chunk)
        feats.append(f)
        probs.append(logits.softmax(1))
    return torch.cat(feats), torch.cat(probs)


def load_evaluator(data: DigitData, cache_dir: Path | None = None, log=print) -> tuple[Evaluator, float]:
    """The evaluator for `data`, trained once per dataset and kept in `cache_dir`."""
    path = Path(cache_dir or DEFAULT_CACHE) / f"{data.name}.pt"
    net = Evaluator(data.num_classes)
    if path.exists():
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["net"])
        return net.eval(), state["accuracy"]
    log(f"training the evaluator for {data.name} (once; cached in {path})")
    net, accuracy = train_evaluator(data, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"net": net.state_dict(), "accuracy": accuracy}, tmp)
    return net, accuracy


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


def _within_manifold(points: torch.Tensor, support: torch.Tensor, k: int) -> torch.Tensor:
    """For each point: is it inside some support sample's ball of radius (distance to its k-th NN)?"""
    radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values  # k+1: the nearest is itself
    return (torch.cdist(points, support) <= radii[None, :]).any(dim=1)


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


def evaluation_inputs(latent_dim: int, num_classes: int, n: int, seed: int = EVAL_SEED):
    """The z [N, latent] every evaluation uses and, for conditional models, labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent_dim), dtype=np.float32)
    labels = np.arange(n) % max(num_classes, 1)
    y = np.eye(num_classes, dtype=np.float32)[labels] if num_classes else None
    return z, labels, y


def draw_all(source: Source, z: np.ndarray, y: np.ndarray | None, batch: int = 500) -> np.ndarray:
    parts = [source.draw(z[i:i + batch], None if y is None else y[i:i + batch]) for i in range(0, len(z), batch)]
    return np.concatenate(parts).astype(np.float32)


def score_images(net: Evaluator, images, real, labels=None, num_classes: int = 10) -> dict:
    """The evaluator's figures for `images` against the real reference set `real` ([M, 1, 28, 28])."""
    feats, probs = predict(net, images)
    real_feats, _ = predict(net, real)
    predicted = probs.argmax(1)
    shares = (predicted.bincount(minlength=num_classes).float() / len(predicted)).tolist()
    m = min(len(feats), len(real_feats))  # precision/recall on equal-sized sets, as in the paper
    precision, recall = precision_recall(real_feats[:m], feats[:m])
    metrics = {
        "samples": len(predicted),
        "class_shares": [round(s, 4) for s in shares],
        "min_class_share": min(shares),
        "max_class_share": max(shares),
        "confidence": float((probs.max(1).values > CONFIDENT).float().mean()),
        "fid": frechet_distance(feats, real_feats),
        "precision": precision,
        "recall": recall,
    }
    if labels is not None:
        metrics["conditional_accuracy"] = float((predicted == torch.as_tensor(labels)).float().mean())
    return metrics


def real_floor(net: Evaluator, data: DigitData) -> dict:
    """The same figures for real digits: the training split against the validation split, i.e. what a
    perfect generator would score with this evaluator, reference set and about this sample size."""
    scored = score_images(net, data.train.images.cpu(), data.val.images.cpu(), data.train.labels.cpu(),
                          data.num_classes)
    return {"fid_floor": scored["fid"], "precision_floor": scored["precision"], "recall_floor": scored["recall"]}


def evaluate_source(source: Source, data: DigitData, n: int = 5000, cache_dir: Path | None = None,
                    log=print) -> dict:
    """Every figure of issue 3 for one generator, plus the evaluator's accuracy and the real floors."""
    net, accuracy = load_evaluator(data, cache_dir, log=log)
    z, labels, y = evaluation_inputs(source.latent_dim, source.num_classes, n)
    images = draw_all(source, z, y)
    if not np.isfinite(images).all():
        raise EvaluationError(f"{source.name}: the generator produced non-finite pixels")
    metrics = score_images(net, images, data.val.images.cpu(), labels if source.num_classes else None,
                           data.num_classes)
    metrics.update(real_floor(net, data))
    metrics["fid_ratio"] = metrics["fid"] / metrics["fid_floor"]
    metrics["evaluator_accuracy"] = accuracy
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def evaluate_run(trainer, source: Source, n: int = 5000, cache_dir: Path | None = None, log=print) -> dict:
    """`evaluate_source` on the run's own dataset, plus a VAE's validation ELBO, which needs the encoder
    and so only a run can give. `source` may be the run's network or its exported file."""
    config = trainer.config
    data = load_dataset(config.dataset, config.data_dir, limit=config.limit)
    metrics = evaluate_source(source, data, n, cache_dir, log=log)
    if hasattr(trainer, "validate"):
        val = trainer.validate(data.val.images, data.val.labels)
        metrics.update({"val_elbo": -val["val_loss"], "val_recon": val["val_recon"]})
    return metrics


ROWS = [  # (key, label, format) for the printed table
    ("conditional_accuracy", "conditional accuracy", "{:.3f}"),
    ("min_class_share", "smallest class share", "{:.3f}"),
    ("max_class_share", "largest class share", "{:.3f}"),
    ("confidence", "confidence (p > 0.9)", "{:.3f}"),
    ("fid", "FID (evaluator features)", "{:.2f}"),
    ("fid_floor", "FID real vs real (floor)", "{:.2f}"),
    ("fid_ratio", "FID / floor", "{:.2f}"),
    ("precision", "precision (k=3)", "{:.3f}"),
    ("recall", "recall (k=3)", "{:.3f}"),
    ("val_elbo", "validation ELBO (nats/image)", "{:.2f}"),
    ("val_recon", "validation reconstruction (nats/image)", "{:.2f}"),
    ("evaluator_accuracy", "evaluator validation accuracy", "{:.4f}"),
]


def format_table(name: str, metrics: dict) -> str:
    lines = [f"| {name} | value |", "|---|---:|"]
    for key, label, fmt in ROWS:
        if metrics.get(key) is not None:
            lines.append(f"| {label} | {fmt.format(metrics[key])} |")
    lines.append(f"| samples | {metrics['samples']} |")
    return "\n".join(lines)


def write_metrics(path: Path, metrics: dict) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
