"""What per-rank BatchNorm statistics cost a 2-process CPU run (PyTorch's SyncBatchNorm runs on GPUs only).

For a model with BatchNorm (cgan's generator) and one without (vae), train the same steps three ways from
the same initial weights and data order: 2 processes at batch B/2 under torchrun (gloo), 1 process at
batch B, and 1 process at batch B with another noise seed. The 2-process run differs from the 1-process
one by its noise streams and, for cgan, by normalising over B/2 images per rank; the two 1-process runs
differ by noise alone. Reported: L2 distance over all weights, 2-process vs 1-process, as a ratio to the
noise-only distance. A ratio near 1 means the per-rank statistics add nothing beyond the noise.

    python tests/benchmarks/ddp_batchnorm.py [--digits 2048] [--epochs 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.data import load_dataset, shuffled_batches  # noqa: E402
from training.loop import load_run  # noqa: E402
from training.models import MODELS, model_config  # noqa: E402
from training.trainers import make_trainer, train_config  # noqa: E402


def by_hand(model: str, data, batch: int, epochs: int, noise_seed: int) -> dict:
    """One process, the loop's initial weights and data order (seed 0), noise from `noise_seed`."""
    torch.manual_seed(0)
    trainer = make_trainer(MODELS[model], model_config(MODELS[model]), train_config(model, batch_size=batch, amp=False,
                                                                                   device="cpu"), 10, torch.device("cpu"))
    torch.manual_seed(noise_seed)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        trainer.train()
        for index, rows in enumerate(shuffled_batches(len(data.train), batch, order)):
            trainer.step(data.train.images[rows], data.train.labels[rows], index)
    return trainer.state_dict()["nets"]


def distance(a: dict, b: dict) -> float:
    """L2 over every floating-point weight (running statistics excluded: CPU ranks keep their own)."""
    total = 0.0
    for role in a:
        for key, value in a[role].items():
            if value.is_floating_point() and "running" not in key:
                total += float(((value - b[role][key]) ** 2).sum())
    return total ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="the global batch")
    args = parser.parse_args()
    data = load_dataset("mnist-5k", limit=args.digits)
    print(f"# {args.digits} digits, {args.epochs} epochs, global batch {args.batch}; 2 processes x "
          f"{args.batch // 2} (gloo) against 1 process x {args.batch}")
    print("| model | BatchNorm | 2 proc vs 1 proc | 1 proc vs 1 proc, other noise | ratio |")
    print("|---|---|---:|---:|---:|")
    for model, batchnorm in (("cgan", "generator"), ("vae", "none")):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "training", "train", model, "--epochs", str(args.epochs), "--limit",
                            str(args.digits), "--batch-size", str(args.batch // 2), "--device", "cpu",
                            "--out", str(run), "--quiet", "--no-amp"],
                           cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            two = load_run(run)[0].state_dict()["nets"]
        one = by_hand(model, data, args.batch, args.epochs, noise_seed=0)
        other = by_hand(model, data, args.batch, args.epochs, noise_seed=1)
        apart, floor = distance(two, one), distance(one, other)
        print(f"| {model} | {batchnorm} | {apart:.3f} | {floor:.3f} | {apart / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
