"""Which per-pod signal should a HorizontalPodAutoscaler read? Measured, not guessed (issue 31).

One `python -m service` (2 workers, exported/) under GET /generate?digit=3&n=1 from wrk at rising offered
loads. The clients think between requests (exponential think time per connection, wrk's Lua `delay`), so
the load is a fraction of the service's capacity measured first at concurrency 64, not a fixed concurrency
(at a fixed concurrency the requests in flight are that concurrency by construction). At each load the
service's /metrics is scraped five times a second, and the candidates are read as the HPA would:
  in flight per worker   digitgen_in_flight_requests / workers (a gauge: the scrapes' mean), and as the
                         prometheus-adapter rule computes it: digitgen_request_seconds_sum's growth per
                         second over workers (Little's law; the probes and scrapes left out)
  queue wait             digitgen_queue_wait_seconds: its sum's growth over its count's in the window
  queued per worker      digitgen_queued_requests / workers (the batchers' queues)
  CPU                    digitgen_process_cpu_seconds of every worker, growth per second per worker
beside the clients' p50 and p99 latency. A proportional autoscaler (desired = current x signal / target)
wants a signal that grows with the load from the start and keeps growing past saturation.

    python tests/benchmarks/autoscale_signal.py [--seconds 8] [--out tests/benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from serve_throughput import GENERATE, STATS_LUA, Server, ensure_wrk, start, stop, wrk

WORKERS = 2
CONNECTIONS = 256
LOADS = (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 1.0, 1.3)  # offered, as fractions of the capacity at c=64
ADAPTER_VALUES = Path(__file__).resolve().parents[2] / "deploy/k8s/prometheus-adapter/values.yaml"
# the endpoints prometheus-adapter's rule leaves out, read from the rule itself
PROBES = re.compile('endpoint="(' + re.search(r'endpoint!~"([^"]+)"', yaml.safe_load(ADAPTER_VALUES.read_text())[
    "rules"]["custom"][0]["metricsQuery"]).group(1) + ')"')
THINK_LUA = """
think_ms = {think_ms}
delay = function() return -math.log(1 - math.random()) * think_ms end
"""


def scrape(url: str) -> dict[str, float]:
    """The candidates' raw series from one scrape, summed over models, versions and workers."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    totals = {"in_flight": 0.0, "queued": 0.0, "wait_sum": 0.0, "wait_count": 0.0, "cpu": 0.0, "workers": 0.0,
              "request_seconds": 0.0}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = re.match(r"[a-z_]+", line).group(0)
        value = float(line.rsplit(" ", 1)[1])
        key = {"digitgen_in_flight_requests": "in_flight", "digitgen_queued_requests": "queued",
               "digitgen_queue_wait_seconds_sum": "wait_sum", "digitgen_queue_wait_seconds_count": "wait_count",
               "digitgen_process_cpu_seconds": "cpu"}.get(name)
        if key:
            totals[key] += value
        if name == "digitgen_process_cpu_seconds":
            totals["workers"] += 1
        if name == "digitgen_request_seconds_sum" and not PROBES.search(line):
            totals["request_seconds"] += value
    return totals


def watch(url: str, stop_event: threading.Event, samples: list) -> None:
    while not stop_event.wait(0.2):
        samples.append((time.monotonic(), scrape(url)))


def measure(binary: str, server: Server, script: str, concurrency: int, seconds: float) -> dict:
    samples: list = []
    done = threading.Event()
    watcher = threading.Thread(target=watch, args=(server.url, done, samples))
    watcher.start()
    result = wrk(binary, script, server.url + GENERATE, concurrency, seconds)
    done.set()
    watcher.join()
    (t0, first), (t1, last) = samples[1], samples[-1]  # the first scrape may predate wrk's connections
    workers = last["workers"] or 1
    served = last["wait_count"] - first["wait_count"]
    return {"rps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "errors": result["errors"],
            "in_flight_per_worker": statistics.fmean(s["in_flight"] for _, s in samples[1:]) / workers,
            # what the adapter's rule computes: request-seconds accrued per second (Little's law)
            "in_flight_from_latency": (last["request_seconds"] - first["request_seconds"]) / (t1 - t0) / workers,
            "queued_per_worker": statistics.fmean(s["queued"] for _, s in samples[1:]) / workers,
            "queue_wait_ms": 1000 * (last["wait_sum"] - first["wait_sum"]) / served if served else 0.0,
            "cpu_per_worker": (last["cpu"] - first["cpu"]) / (t1 - t0) / workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    binary = ensure_wrk()
    server = Server("service", [sys.executable, "-m", "service", "--workers", str(WORKERS)])
    with tempfile.TemporaryDirectory() as folder:
        stats = Path(folder, "stats.lua")
        stats.write_text(STATS_LUA)
        start(server)
        try:
            wrk(binary, str(stats), server.url + GENERATE, 64, 3)  # warm-up
            capacity = wrk(binary, str(stats), server.url + GENERATE, 64, args.seconds)["rps"]
            print(f"capacity at c=64: {capacity:.0f} req/s", flush=True)
            rows = []
            for share in LOADS:
                think_ms = max(0.0, 1000 * CONNECTIONS / (share * capacity))
                script = Path(folder, f"think-{share}.lua")
                script.write_text(THINK_LUA.format(think_ms=think_ms) + STATS_LUA)
                row = {"offered": share, "think_ms": think_ms} | measure(binary, server, str(script), CONNECTIONS,
                                                                           args.seconds)
                rows.append(row)
                print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        finally:
            stop(server)
    print(table(rows, capacity))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoscale_signal.json").write_text(json.dumps({"capacity_rps": capacity, "workers": WORKERS,
                                                                "connections": CONNECTIONS, "rows": rows}, indent=1))


def table(rows: list[dict], capacity: float) -> str:
    lines = ["| offered (x capacity) | served req/s | p50 ms | p99 ms | in flight / worker | (from latency) | "
             "queued / worker | queue wait ms | CPU / worker |", "|" + "---:|" * 9]
    for r in rows:
        lines.append(f"| {r['offered']:.2f} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['in_flight_per_worker']:.2f} | {r['in_flight_from_latency']:.2f} | "
                     f"{r['queued_per_worker']:.2f} | {r['queue_wait_ms']:.2f} | "
                     f"{r['cpu_per_worker']:.2f} |")
    return f"capacity at c=64: {capacity:.0f} req/s\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
