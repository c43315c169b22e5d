"""Training images/s with one process against two under torchrun (gloo, the CPU), at the same global batch.

One process: batch 64 on all the machine's threads. Two processes: batch 32 each on half the threads,
gradients averaged by DistributedDataParallel. Each run is `python -m training train` on a slice of
mnist-5k for 2 epochs; its second epoch's images/s is taken (the first warms up). The two setups alternate
for a few rounds; the table gives each one's median and the ratio.

    python tests/benchmarks/train_processes.py [--rounds 3] [--models cgan,vae] [--limit 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 64


def images_per_s(model: str, processes: int, limit: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = ["-m", "training", "train", model, "--epochs", "2", "--limit", str(limit), "--device", "cpu",
                 "--batch-size", str(GLOBAL_BATCH // processes), "--out", str(out), "--quiet"]
        launch = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
        subprocess.run([*launch, *train], cwd=ROOT, env=env, check=True, capture_output=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="cgan,vae")
    parser.add_argument("--limit", type=int, default=2048, help="training digits per run")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    print(f"# 1 process (batch {GLOBAL_BATCH}, {threads} threads) against 2 (batch {GLOBAL_BATCH // 2} each, "
          f"{max(1, threads // 2)} thread(s) each), {args.limit} digits, median of {args.rounds} rounds")
    print("| model | 1 process img/s | 2 processes img/s | 2 / 1 |")
    print("|---|---:|---:|---:|")
    for model in args.models.split(","):
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for processes in rates:
                rates[processes].append(images_per_s(model, processes, args.limit, threads))
        one, two = (statistics.median(rates[p]) for p in (1, 2))
        print(f"| {model} | {one:.0f} | {two:.0f} | {two / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
