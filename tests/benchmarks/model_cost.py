"""What each bundled model costs the service: ONNX Runtime time per image at batch 1 and 64, one thread.

Every model of exported/manifest.json runs beside a reference: the cgan generator as bundled before
issue 10 (DCGAN, latent 64, 64 channels at 14x14), exported here with random weights (the cost of a graph
does not depend on its weights). A model may cost up to twice the reference per image only where it wins
clearly on quality. Models run in interleaved rounds; the table gives each one's median.

    python tests/benchmarks/model_cost.py [--rounds 5] [--models-dir exported]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import load_manifest

BATCHES = (1, 64)
REFERENCE = "cgan before issue 10"
RESULTS = Path(__file__).parent / "results" / "model_cost.json"


def reference_cgan(folder: Path) -> Path:
    """The pre-issue-10 cgan generator's graph, exported with the project's own exporter."""
    from training.export import export_onnx
    from training.models.gan import GANConfig, Generator

    path = folder / "reference-cgan.onnx"
    export_onnx(Generator(GANConfig(latent_dim=64, g_channels=64), num_classes=10).eval(), 10, path)
    return path


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for node in sess.get_inputs():
        width = node.shape[1]
        out[node.name] = (rng.standard_normal((batch, width), dtype=np.float32) if node.name == "z"
                          else np.eye(width, dtype=np.float32)[rng.integers(0, width, batch)])
    return out


def us_per_image(sess: ort.InferenceSession, feed: dict, batch: int, seconds: float = 0.5) -> float:
    """Mean time per image over repeated runs for about `seconds` (after one warm-up run)."""
    sess.run(["image"], feed)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        sess.run(["image"], feed)
        runs += 1
    return 1e6 * elapsed / (runs * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models-dir", type=Path, default=Path("exported"))
    args = parser.parse_args()

    manifest = load_manifest(args.models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {REFERENCE: reference_cgan(Path(tmp))}
        paths |= {m.name: args.models_dir / m.file for m in manifest.models}
        sessions = {name: session(path) for name, path in paths.items()}
        samples = {(name, b): [] for name in sessions for b in BATCHES}
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                for batch in BATCHES:
                    samples[name, batch].append(us_per_image(sess, feeds(sess, batch), batch))
    median = {key: statistics.median(values) for key, values in samples.items()}
    print(f"| model | us/image, batch 1 | us/image, batch 64 | vs {REFERENCE}, batch 1 | batch 64 |")
    print("|---|---:|---:|---:|---:|")
    for name in sessions:
        one, many = median[name, 1], median[name, 64]
        print(f"| {name} | {one:.0f} | {many:.0f} | {one / median[REFERENCE, 1]:.2f}x | "
              f"{many / median[REFERENCE, 64]:.2f}x |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, 1 thread",
        "rounds": args.rounds,
        "us_per_image": {name: {str(b): round(median[name, b], 1) for b in BATCHES} for name in sessions},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
