"""How good is a generator? The evaluator (training/evaluator.py) judges its samples.

Every figure comes beside the same figure for real test digits, so a model is read against what real
data scores with the same judge. The same code scores a PyTorch run and an exported ONNX file: both are a
`Source` that turns z (and y) into images. The truncation sweep scores one source at several truncations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.atomic import write_text_atomic
from training.data import load_dataset
from training.evaluator import EVAL_SEED, EvaluationError, Judge
from training.metrics import CONFIDENT, PR_NEIGHBOURS, class_figures, code_figures, frechet_distance, precision_recall
from training.models.gan import Generator, info_code
from training.models.vae import VAE

DEFAULT_SAMPLES = 10_000


@dataclass
class Source:
    """Anything that draws images: `draw(z [N, latent], y [N, classes] or None) -> [N, 1, 28, 28]` in [0, 1]."""
    name: str
    latent_dim: int
    num_classes: int  # 0: unconditional
    draw: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    codes: int = 0    # the values of an InfoGAN code it reads from z (a run's generator; a file does not say)


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


def torch_source(name: str, net: Generator | VAE, num_classes: int) -> Source:
    """A network with `generate(z, y)` in eval mode, as a Source."""
    net.eval()

    @torch.no_grad()
    def draw(z, y):
        return net.generate(torch.from_numpy(z), None if y is None else torch.from_numpy(y)).float().numpy()
    return Source(name, net.latent_dim, num_classes, draw, getattr(net, "info_codes", 0))


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


def score_images(judge: Judge, images, labels=None, codes: tuple[np.ndarray, int] | None = None) -> dict:
    """The judge's figures for `images` ([N, 1, 28, 28] in [0, 1]), each beside real digits' figure;
    with `codes` (each image's code value, and how many values there are), what each value draws."""
    feats, probs = judge.predict(images)
    ref_feats, _ = judge.reference_predictions()
    confidence, shares = class_figures(probs, probs.shape[1])
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
    if codes is not None:
        metrics.update(code_figures(probs, torch.as_tensor(codes[0]), codes[1]))
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
    codes = (info_code(torch.from_numpy(z), source.codes).argmax(1).numpy(), source.codes) if source.codes else None
    metrics = score_images(judge, images, labels if source.num_classes else None, codes)
    if truncation != 1.0:
        metrics["truncation"] = truncation
    if "code_digits" in metrics:
        metrics["code_digits"] = [[round(share, 4) for share in row] for row in metrics["code_digits"]]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


TRUNCATIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def truncation_sweep(source: Source, judge: Judge, values=TRUNCATIONS, n: int = DEFAULT_SAMPLES) -> list[dict]:
    """The figures at each truncation t: how fidelity (confidence, FID) trades against diversity (recall)."""
    return [{**evaluate_source(source, judge, n, t), "truncation": t} for t in values]


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
    if "code_digits" in metrics:
        lines += ["", code_table(metrics["code_digits"], metrics["code_purity"])]
    return "\n".join(lines)


def code_table(shares: list[list[float]], purity: float) -> str:
    """What each value of the code draws: its digits of 5% or more, most common first."""
    lines = ["| code value | digits drawn (the judge's, 5% or more) |", "|---:|---|"]
    for value, row in enumerate(shares):
        drawn = sorted(((share, digit) for digit, share in enumerate(row) if share >= 0.05), reverse=True)
        lines.append(f"| {value} | {', '.join(f'{digit} {share:.0%}' for share, digit in drawn) or 'no samples'} |")
    lines.append(f"| | {purity:.1%} of the samples are their value's most common digit |")
    return "\n".join(lines)


def write_metrics(path: Path, metrics: dict) -> None:
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
