"""What the V2 JSON response of n images costs to encode: the service's (service/openinference.py, orjson
writing the float32 array) beside the standard library's json over the same array as Python floats, in one
process, alternated, medians; the ratio is what counts.

    python tests/benchmarks/v2_json_encode.py [--images 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.openinference import infer_response  # noqa: E402


def stdlib(output: np.ndarray) -> bytes:
    body = {"model_name": "cgan", "model_version": "ec9225a65b3d", "outputs": [
        {"name": "image", "datatype": "FP32", "shape": list(output.shape), "data": output.ravel().tolist()}]}
    return json.dumps(body, separators=(",", ":")).encode()


def service(output: np.ndarray) -> bytes:
    return bytes(infer_response(output, "cgan", "ec9225a65b3d", None, binary=False).body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    output = np.random.default_rng(0).random((args.images, 1, 28, 28), dtype=np.float32)
    same = np.array_equal(np.float32(json.loads(stdlib(output))["outputs"][0]["data"]),
                          np.float32(json.loads(service(output))["outputs"][0]["data"]))
    times: dict[str, list[float]] = {"json": [], "service": []}
    for _ in range(args.rounds):
        for name, encode in (("json", stdlib), ("service", service)):
            started = time.perf_counter()
            encode(output)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(f"{args.images} images: json {medians['json']:.2f} ms, service {medians['service']:.2f} ms "
          f"({medians['json'] / medians['service']:.1f}x faster); the same float32 values: {same}")


if __name__ == "__main__":
    main()
