"""Does the EMA of generator weights draw better samples than the raw generator? Measured, not assumed.

Trains `cgan` (and `gan`) once, then scores the final raw and EMA generators on the same z with a small
CNN classifier trained on the mnist-5k training split: conditional accuracy (cgan: share of samples for
digit d classified as d), confidence (share classified with probability > 0.9) and the smallest class
share (a collapsed model shows up there).

    python tests/benchmarks/ema_quality.py [--epochs 20] [--samples 2000] [--ema-decay 0.999]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.data import load_dataset
from training.loop import train
from training.models import MODELS, model_config
from training.trainers import train_config


def train_classifier(data, epochs: int = 8) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = data.train.images, data.train.labels
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            shift = torch.randint(-2, 3, (2,)).tolist()  # light augmentation: a random shift per batch
            loss = F.cross_entropy(net(torch.roll(x[idx], shift, dims=(2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(data.val.images).argmax(1) == data.val.labels).float().mean().item()
    print(f"classifier validation accuracy: {acc:.4f}")
    return net


@torch.no_grad()
def score(generator, classifier, n: int, conditional: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(n, generator.latent_dim, generator=g)
    labels = torch.arange(n) % 10
    y = F.one_hot(labels, 10).float() if conditional else None
    probs = classifier(generator.eval().generate(z, y).float()).softmax(1)
    predicted = probs.argmax(1)
    shares = predicted.bincount(minlength=10).float() / n
    result = {"confidence": (probs.max(1).values > 0.9).float().mean().item(),
              "min_class_share": shares.min().item()}
    if conditional:
        result["cond_accuracy"] = (predicted == labels).float().mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--models", default="cgan,gan")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("mnist-5k")
    classifier = train_classifier(data)
    print(f"EMA decay {args.ema_decay}")
    print("| model | epochs | weights | cond. accuracy | confidence > 0.9 | smallest class share |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models.split(","):
        spec = MODELS[name]
        config = train_config(name, epochs=args.epochs, ema_decay=args.ema_decay)
        with tempfile.TemporaryDirectory() as tmp:
            result = train(config, model_config(spec), Path(tmp) / name, progress=False, data=data,
                           log=lambda *_: None)
        trainer = result.trainer
        for label, net in (("raw", trainer.nets["generator"]), ("EMA", trainer.ema.net)):
            s = score(net, classifier, args.samples, spec.conditional)
            print(f"| {name} | {args.epochs} | {label} | {s.get('cond_accuracy', float('nan')):.3f} | "
                  f"{s['confidence']:.3f} | {s['min_class_share']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
