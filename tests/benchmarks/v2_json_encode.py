"""What the V2 JSON response of n images costs to encode: the service's (service/openinference.py, orjson
writing the float32 array) beside msgspec (the other fast codec; it takes the array as Python floats) and
the standard library's json over the same floats, in one process, alternated, medians; the ratios count.

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


def msgspec_json(output: np.ndarray) -> bytes:
    import msgspec
    body = {"model_name": "cgan", "model_version": "ec9225a65b3d", "outputs": [
        {"name": "image", "datatype": "FP32", "shape": list(output.shape), "data": output.ravel().tolist()}]}
    return msgspec.json.encode(body)


def service(output: np.ndarray) -> bytes:
    return bytes(infer_response(output, "cgan", "ec9225a65b3d", None, binary=False).body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    output = np.random.default_rng(0).random((args.images, 1, 28, 28), dtype=np.float32)
    encoders = {"json": stdlib, "msgspec": msgspec_json, "service": service}
    same = all(np.array_equal(np.float32(json.loads(stdlib(output))["outputs"][0]["data"]),
                              np.float32(json.loads(encode(output))["outputs"][0]["data"])) for encode in encoders.values())
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.rounds):
        for name, encode in encoders.items():
            started = time.perf_counter()
            encode(output)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    sizes = {name: len(encode(output)) for name, encode in encoders.items()}
    print(f"{args.images} images: json {medians['json']:.2f} ms, msgspec {medians['msgspec']:.2f} ms "
          f"({medians['json'] / medians['msgspec']:.1f}x faster), service (orjson) {medians['service']:.2f} ms "
          f"({medians['json'] / medians['service']:.1f}x faster); bytes: json {sizes['json']:,}, msgspec "
          f"{sizes['msgspec']:,}, service {sizes['service']:,}; the same float32 values: {same}")


if __name__ == "__main__":
    main()
