"""Figures of a sample set in the evaluator's feature space and of its class probabilities: FID,
precision/recall (Kynkaanniemi et al. 2019), confidence and class shares, and the expected calibration
error of a classifier (Guo et al. 2017). Plain tensors in, numbers out: no networks here."""

from __future__ import annotations

import numpy as np
import torch

CONFIDENT = 0.9        # "confidence" is the share of samples classified with probability above this
PR_NEIGHBOURS = 3      # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
ECE_BINS = 15


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


def class_figures(probs: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """(share classified with probability above CONFIDENT, share of each predicted class)."""
    predicted = probs.argmax(1)
    shares = (predicted.bincount(minlength=num_classes).float() / len(predicted)).tolist()
    return float((probs.max(1).values > CONFIDENT).float().mean()), shares


def code_figures(probs: torch.Tensor, codes: torch.Tensor, values: int) -> dict:
    """What each value of an InfoGAN code draws: per value, the share of its samples the judge names as
    each digit ([values, classes]), and the share of all samples that are their value's most common digit
    (1: every value draws one digit)."""
    predicted = probs.argmax(1)
    counts = torch.zeros(values, probs.shape[1])
    counts.index_put_((codes, predicted), torch.ones(len(codes)), accumulate=True)
    return {"code_digits": (counts / counts.sum(1, keepdim=True).clamp(min=1)).tolist(),
            "code_purity": float(counts.max(1).values.sum() / len(codes))}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets [N, D]: |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^(1/2))."""
    fa, fb = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
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
