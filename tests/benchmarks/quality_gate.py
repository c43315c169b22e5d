"""What the quality gate costs and how well it sees: measured on the bundled models and judge, one thread.

- spread: each figure over many seeded sample sets of n images, against the binomial standard error
  sqrt(p (1 - p) / n) the tolerance is built on, for several n: how many samples give a stable figure;
- cost: the gate's time per model at each n (draw n images, judge them);
- start-up: a worker's warm-up (open, warm, gate) with the gate on and off, in interleaved rounds; the
  added time per model is asserted below GATE_BUDGET_S;
- live: the batch thread's cost of `LiveQuality.offer`, and the scorer's per hand-off;
- refusals: what the gate says of each bundled model's file with its weights scrambled, and of one
  model's file standing in for another (the figures of the model it replaces).

    python tests/benchmarks/quality_gate.py [--models-dir exported] [--rounds 3] [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the scrambler of test_quality.py

from test_quality import scramble  # noqa: E402

from service import quality  # noqa: E402
from service.config import Settings  # noqa: E402
from service.lifecycle import decided_set  # noqa: E402
from service.manifest import load_manifest, sha256_of  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.modelset import Loader  # noqa: E402

SAMPLE_SIZES = (250, 500, 1000, 2000)
GATE_BUDGET_S = 1.0  # the most the gate may add to a worker's start-up per model, one thread
RESULTS = Path(__file__).parent / "results" / "quality_gate.json"


def settings_for(models_dir: Path, gate: bool = True) -> Settings:
    return Settings(models_dir=models_dir, intra_op_threads=1, providers="cpu", quality_gate=gate)


def warmed(models_dir: Path, gate: bool = True):
    settings = settings_for(models_dir, gate)
    return decided_set(Loader.of(settings), (1, settings.max_n))


def spread(models, seeds: int) -> dict:
    """Per model and n: each figure's standard deviation over `seeds` sample sets, and the binomial
    standard error at its recorded value; and the gate's median time."""
    out = {}
    for name, model in models.models.items():
        recorded, judge = model.entry.quality, models.judges.loaded[model.entry.quality.judge]
        out[name] = {}
        for n in SAMPLE_SIZES:
            runs = [quality.gate(model, judge, recorded.model_copy(update={"seed": 10_000 + s}), n)
                    for s in range(seeds)]
            row = {"gate_s": round(statistics.median(r.seconds for r in runs), 4)}
            for key in runs[0].lowest:
                p = getattr(recorded, key)
                row[key] = {"recorded": p, "mean": round(statistics.fmean(r.measured[key] for r in runs), 4),
                            "sd": round(statistics.stdev(r.measured[key] for r in runs), 4),
                            "binomial_se": round((p * (1 - p) / n) ** 0.5, 4),
                            "tolerance": round(quality.tolerance(p, n), 4)}
            out[name][n] = row
            print(f"{name} n={n}: gate {row['gate_s'] * 1000:.0f} ms; " + "; ".join(
                f"{k} sd {v['sd']:.4f} (binomial {v['binomial_se']:.4f}, tolerance {v['tolerance']:.4f})"
                for k, v in row.items() if k != "gate_s"))
    return out


def startup(models_dir: Path, rounds: int) -> dict:
    """Seconds of a worker's warm-up (judges opened, every model warmed and, when on, gated)."""
    times = {True: [], False: []}
    for _ in range(rounds):
        for gate in (False, True):
            started = time.perf_counter()
            result = warmed(models_dir, gate)
            times[gate].append(time.perf_counter() - started)
            assert not result.failures, result.failures
    models = len(load_manifest(models_dir).models)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    added = (on - off) / models
    print(f"start-up: {off:.2f} s with the gate off, {on:.2f} s on: +{added * 1000:.0f} ms per model "
          f"({models} models, {quality.GATE_SAMPLES} samples each)")
    return {"models": models, "gate_samples": quality.GATE_SAMPLES, "off_s": round(off, 3), "on_s": round(on, 3),
            "added_per_model_s": round(added, 3), "budget_per_model_s": GATE_BUDGET_S}


def live_cost(models) -> dict:
    """The batch thread's cost of an offer (the usual case, not due; and a hand-off, median of 50 spaced so
    the scorer keeps up) and the scorer's cost per hand-off of LIVE_ROWS rows."""
    live = quality.LiveQuality(Metrics(), lambda: models)
    model = next(iter(models.models.values()))
    z = np.random.default_rng(0).standard_normal((64, model.entry.latent_dim), dtype=np.float32)
    output = model.run(z, np.eye(10, dtype=np.float32)[np.arange(64) % 10] if model.entry.conditional else None)
    live._due[model.name] = float("inf")
    started = time.perf_counter()
    for _ in range(100_000):
        live.offer(model, output)
    not_due = (time.perf_counter() - started) / 100_000
    handed = []
    for _ in range(50):
        live._due.clear()
        started = time.perf_counter()
        live.offer(model, output)
        handed.append(time.perf_counter() - started)
        time.sleep(0.01)
    judge = models.judges.loaded[model.entry.quality.judge]
    rows = output[:quality.LIVE_ROWS].copy()
    judge.probabilities(rows)
    started = time.perf_counter()
    for _ in range(200):
        judge.probabilities(rows)
    scored = (time.perf_counter() - started) / 200
    live.close()
    per_s, handoff = 1 / quality.LIVE_INTERVAL_S, statistics.median(handed)
    print(f"live: offer {not_due * 1e9:.0f} ns (not due), {handoff * 1e6:.1f} us (hand-off); scoring "
          f"{quality.LIVE_ROWS} rows {scored * 1000:.2f} ms: at most {per_s * scored * 100:.2f}% of a core per model")
    return {"offer_not_due_ns": round(not_due * 1e9), "offer_handoff_us": round(handoff * 1e6, 1),
            "score_handoff_ms": round(scored * 1000, 3), "handoffs_per_s_per_model": per_s,
            "core_share_per_model": round(per_s * scored, 5)}


def refusals(models_dir: Path) -> dict:
    """The gate's verdict on each model scrambled, and on one model's file standing in for another."""
    out = {}
    manifest = load_manifest(models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for entry in manifest.models:
            folder = Path(tmp) / entry.name
            shutil.copytree(models_dir, folder, ignore=shutil.ignore_patterns("*.png", "*.gif", "examples"))
            scramble(folder, entry.name)
            out[f"{entry.name} scrambled"] = warmed(folder).failures.get(entry.name, "passed")
        folder = Path(tmp) / "swapped"
        shutil.copytree(models_dir, folder, ignore=shutil.ignore_patterns("*.png", "*.gif", "examples"))
        gan, wgan = manifest.model("gan"), manifest.model("wgan")
        shutil.copyfile(folder / wgan.file, folder / gan.file)  # same interface, another model's weights
        others = manifest.model_copy(update={"models": [m for m in manifest.models if m.name != "gan"], "rollouts": {}})
        (folder / "manifest.json").write_text(others.upsert(gan.model_copy(
            update={"sha256": sha256_of(folder / gan.file)})).to_json())
        out["wgan's file as gan"] = warmed(folder).failures.get("gan", "passed")
    for case, verdict in out.items():
        print(f"{case}: {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("exported"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    logging.getLogger("digitgen").setLevel(logging.CRITICAL)  # the refusals are printed below, once

    models = warmed(args.models_dir)
    results = {"machine": f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, 1 thread",
               "gate_samples": quality.GATE_SAMPLES, "z": quality.GATE_Z,
               "spread": spread(models, args.seeds), "live": live_cost(models),
               "refusals": refusals(args.models_dir), "startup": startup(args.models_dir, args.rounds)}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    added = results["startup"]["added_per_model_s"]
    assert added <= GATE_BUDGET_S, f"the gate adds {added:.2f} s per model to start-up (budget {GATE_BUDGET_S} s)"


if __name__ == "__main__":
    main()
