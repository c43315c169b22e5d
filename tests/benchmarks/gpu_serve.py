"""The service on a GPU machine: CUDA mode beside CPU mode on the same machine, one command, one folder.

Run it on a machine with an NVIDIA GPU, from the project root, with the base package and onnxruntime-gpu
importable (PYTHONPATH or an environment) and the `hey` load generator on the PATH or in HEY:

    python3 tests/benchmarks/gpu_serve.py --out $OUT/gpu [--seconds 8] [--concurrency 64]

For each mode (`--providers cpu`; `--providers cuda` with the GPU sessions in one inference process, the
default; the same with a CUDA session per worker; each with `make serve`'s default workers, plus any
`--mode NAME:DIGITGEN_X=V,...`), it starts `python3 -m service` on exported/, warms it, and drives
each load with hey at the same concurrency: /generate?digit=3&n=1, /generate?n=64 as JSON and as a PNG
grid, and V2 binary infer of one image. It records req/s, images/s, p99 and the GPU memory the service
holds (nvidia-smi: its processes' own figures, and the GPU's memory in use against before it started, for
where a container hides the processes), and writes OUT/gpu_serve.json and OUT/gpu_serve.md (the table, with the
machine named and the targets of the GPU-serving work checked: n=64 at least 4x the CPU mode's images/s,
n=1 at least its req/s, p99 at most 50 ms, GPU memory at most 8 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from v2_request import binary_infer

ROOT = Path(__file__).resolve().parents[2]
LOADS = [  # name, path, images per request, extra hey arguments
    ("n=1 PNG", "/generate?digit=3&n=1", 1, []),
    ("n=64 JSON", "/generate?digit=3&n=64&format=json", 64, []),
    ("n=64 PNG grid", "/generate?digit=3&n=64", 64, []),
    ("V2 binary, 1 image", "/v2/models/cgan/infer", 1, ["v2"]),
]
TARGETS = {"n64_images_ratio": 4.0, "n1_rps_ratio": 1.0, "p99_ms": 50.0, "gpu_mib": 8192}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2_body(folder: Path) -> tuple[Path, str]:
    """A binary V2 request for one cgan image in a file, and its JSON header's length."""
    header, body = binary_infer(1)
    path = folder / "v2.bin"
    path.write_bytes(body)
    return path, str(len(header))


def hey(url: str, seconds: float, concurrency: int, body: tuple[Path, str] | None) -> dict:
    command = [os.environ.get("HEY", "hey"), "-z", f"{seconds}s", "-c", str(concurrency), "-o", "csv"]
    if body:
        command += ["-m", "POST", "-D", str(body[0]), "-T", "application/octet-stream",
                    "-H", f"Inference-Header-Content-Length: {body[1]}"]
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [line.split(",") for line in out[1:] if line and line[0].isdigit()]
    latencies = sorted(float(r[0]) for r in rows)  # seconds; hey's CSV: response-time first, status code 7th
    ok = sum(1 for r in rows if r[6] == "200")
    return {"requests": len(rows), "ok": ok, "rps": len(rows) / seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None}


def gpu_mib(pids: set[int]) -> float | None:
    """GPU memory the service's processes hold (nvidia-smi), or None without one."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory")
    if out is None:
        return None
    return sum(float(used) for pid, used in (line.split(", ") for line in out.splitlines() if line.strip())
               if int(pid) in pids)


def gpu_used_mib() -> float | None:
    """The GPU's memory in use (all processes), or None without nvidia-smi."""
    out = nvidia_smi("--query-gpu=memory.used")
    return sum(float(line) for line in out.splitlines() if line.strip()) if out is not None else None


def nvidia_smi(query: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def service_pids(root_pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split("\n")[1:]
    children, found = {}, {root_pid}
    for line in out:
        if line.strip():
            pid, ppid = map(int, line.split())
            children.setdefault(ppid, []).append(pid)
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def run_mode(name: str, env: dict[str, str], args, body) -> dict:
    port = free_port()
    before = gpu_used_mib()
    log = open(args.out / f"service-{name.replace(' ', '-')}.log", "w+b")  # kept: what each mode logged
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--models-dir", "exported"],
                               cwd=ROOT, env=os.environ | {"DIGITGEN_LOG_LEVEL": "warning"} | env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"mode {name} did not start:\n{log.read().decode()[-3000:]}")
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        models = json.loads(urllib.request.urlopen(url + "/models").read())["models"]
        result = {"env": env, "providers": {m["name"]: m["provider"] for m in models},
                  "gpu_process": {m["name"]: m.get("gpu_process") for m in models},
                  "cpu_up_to_batch": {m["name"]: m["cpu_up_to_batch"] for m in models},
                  "started_s": time.monotonic() - started, "loads": {}}
        for load, path, images, extra in LOADS:
            hey(url + path, 2, args.concurrency, body if "v2" in extra else None)  # warm-up
            run = hey(url + path, args.seconds, args.concurrency, body if "v2" in extra else None)
            run["images_per_s"] = run["rps"] * images
            result["loads"][load] = run
            print(f"{name:12} {load:20} {run['rps']:9.0f} req/s {run['images_per_s']:10.0f} images/s "
                  f"p99 {run['p99_ms']:.1f} ms ({run['ok']}/{run['requests']} ok)", flush=True)
        pids = service_pids(process.pid)
        result["gpu_mib"] = gpu_mib(pids)
        now = gpu_used_mib()
        result["gpu_mib_delta"] = now - before if now is not None and before is not None else None
        result["processes"] = len(pids)
        return result
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def table(results: dict) -> str:
    rows = ["| mode | load | req/s | images/s | p99 ms | GPU memory MiB (processes / GPU in use) |",
            "|---|---|---:|---:|---:|---:|"]
    for mode, result in results.items():
        memory = " / ".join("-" if m is None else f"{m:,.0f}" for m in (result["gpu_mib"], result["gpu_mib_delta"]))
        for load, run in result["loads"].items():
            rows.append(f"| {mode} | {load} | {run['rps']:,.0f} | {run['images_per_s']:,.0f} | {run['p99_ms']:.1f} | "
                        f"{memory} |")
    return "\n".join(rows)


def verdicts(results: dict) -> list[str]:
    """Each CUDA mode against the CPU mode, and every mode's p99, against the targets."""
    cpu = results.get("cpu")
    lines = []
    for mode, cuda in results.items():
        if mode == "cpu" or cpu is None:
            continue
        for load in ("n=64 JSON", "n=64 PNG grid"):
            ratio = cuda["loads"][load]["images_per_s"] / cpu["loads"][load]["images_per_s"]
            lines.append(f"{mode}, {load}: {ratio:.2f}x the CPU mode's images/s (target >= {TARGETS['n64_images_ratio']}x)")
        ratio = cuda["loads"]["n=1 PNG"]["rps"] / cpu["loads"]["n=1 PNG"]["rps"]
        lines.append(f"{mode}, n=1: {ratio:.2f}x the CPU mode's req/s (target >= {TARGETS['n1_rps_ratio']}x)")
        memory = max((m for m in (cuda["gpu_mib"], cuda["gpu_mib_delta"]) if m is not None), default=None)
        lines.append(f"{mode}: GPU memory {memory} MiB (target <= {TARGETS['gpu_mib']})")
    for mode, result in results.items():
        worst = max(run["p99_ms"] for run in result["loads"].values())
        lines.append(f"{mode}: worst p99 {worst:.1f} ms (target <= {TARGETS['p99_ms']:.0f})")
    return lines


def parse_mode(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    return name, dict(a.split("=", 1) for a in assignments.split(",") if a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--mode", action="append", default=[], help="NAME:DIGITGEN_X=V,... another mode")
    parser.add_argument("--only", action="append", help="run only this mode (repeatable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    modes = {"cpu": {"DIGITGEN_PROVIDERS": "cpu"}, "cuda": {"DIGITGEN_PROVIDERS": "cuda"},
             "cuda per-worker": {"DIGITGEN_PROVIDERS": "cuda", "DIGITGEN_GPU_SESSIONS": "per-worker"}} \
        | dict(map(parse_mode, args.mode))
    if args.only:
        modes = {name: modes[name] for name in args.only}
    body = v2_body(args.out)
    gpu = (nvidia_smi("--query-gpu=name") or "no GPU found (nvidia-smi missing)").strip()
    machine = f"{gpu}, {os.cpu_count()} CPUs"
    results, failed = {}, {}
    for name, env in modes.items():  # the files are rewritten after each mode: a cut-short run keeps its part
        try:
            results[name] = run_mode(name, env, args, body)
        except (RuntimeError, subprocess.SubprocessError, OSError) as err:
            failed[name] = str(err)
            print(f"error: {err}", file=sys.stderr)
        text = "\n".join([f"# The service on {machine}", "", f"hey -z {args.seconds:g}s -c {args.concurrency}", "",
                          table(results), "", *verdicts(results), *(f"{n}: FAILED (see its log)" for n in failed), ""])
        (args.out / "gpu_serve.md").write_text(text)
        (args.out / "gpu_serve.json").write_text(json.dumps({"machine": machine, "results": results,
                                                             "failed": failed}, indent=2) + "\n")
    print(text)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
