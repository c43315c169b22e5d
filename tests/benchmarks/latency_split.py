"""Where one request's time goes at concurrency 1 (issue 29: V2 binary infer, p50 at most 1.2x Triton's).

The service (2 workers, exported/) serves POST /v2/models/cgan/infer, one image, binary in and out, to wrk at
one connection; the service's own histograms, scraped before and after, split the mean: ONNX Runtime's call
(digitgen_inference_seconds), the wait for the batch (digitgen_queue_wait_seconds), the rest of the app from
the ASGI call to its last byte (digitgen_request_seconds less those two: routing, parsing the tensors,
the hand-offs to the batch thread and back, the response), and what lies outside the app (the client's
mean less the app's: the HTTP server's parsing and writing, the kernel, wrk). Where a Triton build is
found (TRITON_SERVER, as serve_throughput.py), it serves the same request in the same run for its mean
and p50.

    python tests/benchmarks/latency_split.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

from serve_throughput import ROOT, STATS_LUA, V2_INFER, Server, ensure_wrk, start, stop, triton_server, v2_request_lua, wrk

MEAN_LUA = STATS_LUA.replace('"p50_ms": %.3f,', '"p50_ms": %.3f, "mean_ms": %.4f,').replace(
    "latency:percentile(50) / 1000,", "latency:percentile(50) / 1000, latency.mean / 1000,")


def histogram_sums(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the three histograms, for the cgan model and the V2 infer endpoint."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    found = {}
    for name, selector in (("inference", r'digitgen_inference_seconds_(sum|count)\{model="cgan"'),
                           ("queue_wait", r'digitgen_queue_wait_seconds_(sum|count)\{model="cgan"'),
                           ("request", r'digitgen_request_seconds_(sum|count)\{endpoint="/v2/models/\{name\}/infer"')):
        sums = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            match = re.match(selector, line)
            if match:
                sums[match.group(1)] += float(line.rsplit(" ", 1)[1])
        found[name] = (sums["sum"], sums["count"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    binary = ensure_wrk()
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder, "v2.lua")
        script.write_text(v2_request_lua() + MEAN_LUA)
        service = Server("service", [sys.executable, "-m", "service", "--workers", "2"],
                         {"DIGITGEN_MODELS_DIR": str(ROOT / "exported")}, ready_path="/readyz")
        servers = [service] + [t for t in [triton_server(Path(folder))] if t]
        results = {}
        try:
            for server in servers:
                start(server)
                wrk(binary, str(script), server.url + V2_INFER, 1, 2)  # warm-up
                before = histogram_sums(server.url) if server is service else None
                run = wrk(binary, str(script), server.url + V2_INFER, 1, args.seconds)
                results[server.name] = {"p50_ms": run["p50_ms"], "mean_ms": run["mean_ms"], "rps": run["rps"]}
                if before is not None:
                    after = histogram_sums(server.url)
                    means = {k: 1000 * (after[k][0] - before[k][0]) / max(1.0, after[k][1] - before[k][1])
                             for k in after}
                    results[server.name] |= {"onnx_runtime_ms": means["inference"], "queue_wait_ms": means["queue_wait"],
                                             "rest_of_app_ms": means["request"] - means["inference"] - means["queue_wait"],
                                             "outside_app_ms": run["mean_ms"] - means["request"]}
                stop(server)
        finally:
            for server in servers:
                stop(server)
    print(json.dumps(results, indent=1))
    s = results["service"]
    print(f"service, mean {s['mean_ms']:.3f} ms (p50 {s['p50_ms']:.3f}): ONNX Runtime {s['onnx_runtime_ms']:.3f}, "
          f"queue wait {s['queue_wait_ms']:.3f}, the rest of the app {s['rest_of_app_ms']:.3f}, outside the app "
          f"{s['outside_app_ms']:.3f}")
    if "triton" in results:
        t = results["triton"]
        print(f"triton, mean {t['mean_ms']:.3f} ms (p50 {t['p50_ms']:.3f}); service / triton p50 "
              f"{s['p50_ms'] / t['p50_ms']:.2f}x")


if __name__ == "__main__":
    main()
