"""Does the EMA of generator weights draw better samples than the raw generator? Measured, not assumed.

Trains `cgan` (and `gan`) once, then scores the final raw and EMA generators with the project's evaluator
(training/evaluate.py: the same samples, conditional accuracy, confidence, smallest class share, FID
against the real-vs-real floor).

    python tests/benchmarks/ema_quality.py [--epochs 20] [--samples 5000] [--ema-decay 0.999]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from training import evaluate
from training.data import load_dataset
from training.loop import train
from training.models import MODELS, model_config
from training.trainers import train_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--models", default="cgan,gan")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("mnist-5k")
    print(f"EMA decay {args.ema_decay}")
    print("| model | epochs | weights | cond. accuracy | confidence > 0.9 | smallest class share | FID / floor |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        spec = MODELS[name]
        config = train_config(name, epochs=args.epochs, ema_decay=args.ema_decay)
        with tempfile.TemporaryDirectory() as tmp:
            result = train(config, model_config(spec), Path(tmp) / name, progress=False, data=data,
                           log=lambda *_: None)
        trainer = result.trainer
        for label, net in (("raw", trainer.nets["generator"]), ("EMA", trainer.ema.net)):
            source = evaluate.torch_source(name, net.float(), trainer.num_classes)
            s = evaluate.evaluate_source(source, data, args.samples, log=lambda *_: None)
            print(f"| {name} | {args.epochs} | {label} | {s.get('conditional_accuracy', float('nan')):.3f} | "
                  f"{s['confidence']:.3f} | {s['min_class_share']:.3f} | {s['fid_ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
