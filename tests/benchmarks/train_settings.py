"""Training images/s of each family at other batch sizes and thread counts than the recipes' (batch 64 for
the GANs, 128 for the VAEs, every CPU thread): what a larger batch or fewer threads would buy.

Our loop as `python -m training train` runs it (training.trainers, bf16 autocast where native), on the
CPU, every setting the same number of images per round (so a large batch takes fewer steps); the settings
run side by side in interleaved rounds and the table gives each one's median images/s, and its ratio to
the recipe's batch on all threads. Throughput only: a larger batch takes fewer optimizer steps per epoch,
so it needs its own learning rate and schedule before it can replace a recipe's batch.

    python tests/benchmarks/train_settings.py [--rounds 3] [--images 3840] [--models cgan,gan,wgan,vae]
                                              [--batch-sizes 32,64,128,256] [--threads 1,ALL]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from train_throughput import our_loop  # noqa: E402  (run as a script from tests/benchmarks)

from training.data import load_dataset
from training.trainers import train_config

RESULTS = Path(__file__).parent / "results" / "train_settings.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=3840, help="images per setting per round")
    parser.add_argument("--models", default="cgan,gan,wgan,vae")
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = sorted({int(t) for t in args.threads.split(",")})
    data = load_dataset("mnist-5k")
    print(f"# training images/s by batch size and threads, CPU: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.images} images per setting per round, median of {args.rounds}")
    print("| model | recipe batch | batch | threads | img/s | vs recipe batch, all threads |")
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    for name in args.models.split(","):
        recipe_batch = train_config(name).batch_size
        settings = [(b, t) for b in sizes for t in threads]
        loops = {(b, t): our_loop(name, data, max(1, args.images // b), amp=True, batch_size=b)
                 for b, t in settings}
        rates: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
        for round_ in range(args.rounds + 1):  # round 0 warms every loop up (oneDNN kernel choice)
            for b, t in settings:
                torch.set_num_threads(t)
                rate = loops[b, t]()
                if round_:
                    rates[b, t].append(rate)
        med = {s: statistics.median(r) for s, r in rates.items()}
        reference = med.get((recipe_batch, threads[-1]))
        for b, t in settings:
            ratio = f"{med[b, t] / reference:.2f}x" if reference else "-"
            print(f"| {name} | {recipe_batch} | {b} | {t} | {med[b, t]:.0f} | {ratio} |", flush=True)
            results.append({"model": name, "batch": b, "threads": t, "images_per_s": round(med[b, t], 1)})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "rounds": args.rounds, "images": args.images,
                                   "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
