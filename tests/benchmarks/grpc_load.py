"""A gRPC load generator for the Open Inference Protocol (no ghz here): `concurrency` calls in flight on
`channels` channels (1 by default: one HTTP/2 connection, as one client holds; several: as several clients,
each its own connection, spread over them in turn) from an asyncio loop, each ModelInfer of one cgan image as
raw_input_contents (built with tritonclient's own message classes), for `seconds`; prints one JSON line:
requests, seconds, rps, p50_ms, p99_ms, errors. Run it in its own process beside the server, as wrk is.

    python tests/benchmarks/grpc_load.py HOST:PORT [--concurrency 64] [--channels 1] [--seconds 8] [--images 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(images: int, latent_dim: int = 64, num_classes: int = 10) -> bytes:
    z = np.random.default_rng(3).standard_normal((images, latent_dim), dtype=np.float32)
    y = np.eye(num_classes, dtype=np.float32)[[3] * images]
    request = service_pb2.ModelInferRequest(model_name="cgan")
    request.inputs.add(name="z", datatype="FP32", shape=list(z.shape))
    request.inputs.add(name="y", datatype="FP32", shape=list(y.shape))
    request.outputs.add(name="image")
    request.raw_input_contents.extend([z.tobytes(), y.tobytes()])
    return request.SerializeToString()


async def load(address: str, concurrency: int, seconds: float, images: int, channels: int = 1) -> dict:
    body, latencies, errors = request_bytes(images), [], 0
    # a subchannel pool of each channel's own: else grpc shares one connection among equal channels
    opened = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    try:
        calls = [channel.unary_unary(METHOD) for channel in opened]  # bytes in, bytes out: no protobuf work per call
        for call in calls:
            await call(body)
        deadline = time.perf_counter() + seconds

        async def caller(call):
            nonlocal errors
            while (started := time.perf_counter()) < deadline:
                try:
                    await call(body)
                    latencies.append(time.perf_counter() - started)
                except grpc.RpcError:
                    errors += 1
        began = time.perf_counter()
        await asyncio.gather(*(caller(calls[i % channels]) for i in range(concurrency)))
        elapsed = time.perf_counter() - began
    finally:
        for channel in opened:
            await channel.close()
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "errors": errors}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(load(args.address, args.concurrency, args.seconds, args.images, args.channels))))
