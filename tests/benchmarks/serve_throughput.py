"""Load benchmark of the HTTP service: the service against a plain baseline and the HTTP ceiling.

Three servers run side by side on this machine under one load generator (wrk, installed from Debian's
packages when missing), each after a warm-up, with the same stack: uvicorn (uvloop, httptools, no access
log) in the same number of worker processes, each with its own listening socket (service/workers.py):
  baseline  tests/benchmarks/servers/baseline.py: sync FastAPI endpoint, one session.run per request,
            Pillow PNG, the bundled cgan
  ceiling   tests/benchmarks/servers/ceiling.py: a constant, pre-encoded PNG from an async endpoint
  service   python -m service on exported/ (dynamic batching, `make serve`'s defaults)
Loads: GET /generate?digit=3&n=1 at concurrency 1, 16 and 64, GET /sample?n=64 at concurrency 16, and
(service only) one image through the Open Inference Protocol, POST /v2/models/cgan/infer with binary
tensor data in and out, at concurrency 64: the protocol's cost beside /generate's; and (service only) a
seeded /generate revalidated with its ETag (If-None-Match: every answer a 304 without the model) at
concurrency 64, beside the ceiling;
the loads are interleaved across the servers (each round runs every server at one load before the
next load). Then the in-process limit (ONNX Runtime + PNG encoding in a loop, no HTTP) and the
service's resident memory over a run at concurrency 64.

    python tests/benchmarks/serve_throughput.py [--seconds 10] [--memory-seconds 60] [--rounds 1]
        [--workers 1] [--variant NAME:DIGITGEN_X=V,...] [--ref GIT_REF] [--out tests/benchmarks/results]

--variant adds a service configuration (its environment) as another server, for before/after checks;
--ref adds the service as it was at a commit (a git worktree of it, serving that commit's own exported/) as the
server `service@REF`, measured in the same rounds: a change's throughput as a ratio against its baseline.
Writes OUT/serve_throughput.json and OUT/serve_throughput.png (throughput against concurrency).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from v2_request import binary_infer

ROOT = Path(__file__).resolve().parents[2]
SERVERS_DIR = Path(__file__).resolve().parent / "servers"
GENERATE = "/generate?digit=3&n=1"
SAMPLE = "/sample?n=64"
V2_INFER = "/v2/models/cgan/infer"
V2_BATCH = "/v2/models/cgan/infer x64"  # the same route, 64 images per request
REVALIDATE = "/generate?digit=3&n=1&seed=7"  # sent with If-None-Match: its ETag
GRPC_INFER = "gRPC ModelInfer"  # one image per call, driven by grpc_load.py, on one channel (one connection)
GRPC_CLIENTS = "gRPC ModelInfer x4 channels"  # the same calls over four connections, as four clients
LOADS = [(GENERATE, 1, 1), (GENERATE, 1, 16), (GENERATE, 1, 64), (SAMPLE, 64, 16), (V2_INFER, 1, 1),
         (V2_INFER, 1, 64), (V2_BATCH, 64, 16), (REVALIDATE, 0, 64), (GRPC_INFER, 1, 64),
         (GRPC_CLIENTS, 1, 64)]  # path, images, concurrency
V2_LOADS = {V2_INFER, V2_BATCH, GRPC_INFER, GRPC_CLIENTS}  # what Triton serves
TRITON = Path(os.environ.get("TRITON_SERVER", "/tmp/triton/tritonserver"))  # a Triton 2.51 build with its ONNX Runtime backend
STATS_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %d, "seconds": %.4f, "p50_ms": %.3f, "p99_ms": %.3f, '
    .. '"socket_errors": %d, "non_2xx": %d}\\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def v2_request_lua(images: int = 1) -> str:
    """wrk's request for V2_INFER: `images` z and one-hot 3s as binary tensor data, binary output."""
    header, body = binary_infer(images)
    escaped = "".join(f"\\{b}" for b in body)  # Lua decimal escapes
    return (f'wrk.method = "POST"\nwrk.headers["Inference-Header-Content-Length"] = "{len(header)}"\n'
            f'wrk.headers["Content-Type"] = "application/octet-stream"\nwrk.body = "{escaped}"\n')


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = GENERATE
    cwd: Path = ROOT
    port: int = 0
    grpc_port: int = 0  # 0: it speaks no gRPC
    process: subprocess.Popen | None = None
    log: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def ensure_wrk() -> str:
    """wrk's path; installs Debian's package when it is missing (root or password-less sudo)."""
    if path := shutil.which("wrk"):
        return path
    if not shutil.which("apt-get"):
        sys.exit("error: wrk is not installed and there is no apt-get to install it with")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print("installing wrk: apt-get update && apt-get install -y wrk", flush=True)
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if subprocess.run(sudo + step).returncode != 0:
            sys.exit(f"error: `{' '.join(sudo + step)}` failed; install wrk and run again")
    return shutil.which("wrk") or sys.exit("error: wrk still not found after installing it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_app(name: str, workers: int) -> list[str]:
    return [sys.executable, str(SERVERS_DIR / "launch.py"), name, "--workers", str(workers)]


def start(server: Server) -> None:
    server.port = free_port()
    if any("{port}" in part for part in server.command):  # Triton: its own flags
        server.grpc_port = free_port()
        command = [part.format(port=server.port, grpc_port=server.grpc_port) for part in server.command]
    else:
        command = server.command + ["--port", str(server.port)]
    env = os.environ | server.env
    if server.env.get("DIGITGEN_GRPC_PORT") == "":
        server.grpc_port = free_port()
        env["DIGITGEN_GRPC_PORT"] = str(server.grpc_port)
    server.log = tempfile.TemporaryFile()  # a pipe nobody reads could fill up and stall the server
    server.process = subprocess.Popen(command, cwd=server.cwd, env=env, stdout=server.log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.log.seek(0)
            sys.exit(f"error: {server.name} exited at startup:\n{server.log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(server.url + server.ready_path, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"error: {server.name} was not ready within 120 s")


def stop(server: Server) -> None:
    if server.process and server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()


def wrk(binary: str, script: str, url: str, concurrency: int, seconds: float) -> dict:
    out = subprocess.run([binary, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", script,
                          url],
                         capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["rps"] = result["requests"] / result["seconds"]
    result["errors"] = result["socket_errors"] + result["non_2xx"]
    return result


def grpc_run(address: str, concurrency: int, seconds: float, channels: int = 1) -> dict:
    """grpc_load.py in its own process, as wrk runs in its own."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_load.py")), address, "--concurrency",
                          str(concurrency), "--seconds", str(seconds), "--channels", str(channels)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def triton_server(workdir: Path) -> Server | None:
    """Triton 2.51 with its ONNX Runtime backend over `python -m service triton-repository` of exported/
    (the repository's own config: dynamic batching, 100 us queue delay, one CPU instance)."""
    if not TRITON.exists():
        print(f"skipping triton: no {TRITON} (set TRITON_SERVER to a tritonserver binary with the ONNX Runtime backend)")
        return None
    repository = workdir / "triton-repository"
    subprocess.run([sys.executable, "-m", "service", "triton-repository", str(repository)], cwd=ROOT, check=True,
                   capture_output=True)
    return Server("triton", [str(TRITON), f"--model-repository={repository}", "--http-address=127.0.0.1",
                             "--http-port={port}", "--grpc-address=127.0.0.1", "--grpc-port={grpc_port}",
                             "--allow-metrics=false", "--log-warning=false", "--log-info=false"],
                  ready_path="/v2/health/ready")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (uvicorn workers)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(l for l in status.splitlines() if l.startswith("VmRSS:")).split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def in_process_limit(n: int, seconds: float) -> float:
    """Images/s of the service's own session settings and PNG encoding in a loop: no HTTP, no batching."""
    from service import imaging, sampling
    from service.config import Settings, available_cpus
    from service.modelset import Loader, open_set
    model = open_set(Loader.of(Settings(workers=1, intra_op_threads=available_cpus()))).models["cgan"]
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        z = sampling.latents(count, n, model.entry.latent_dim)
        y = sampling.one_hot(sampling.random_classes(count, n, 10), 10)
        imaging.png_grid(imaging.to_uint8(model.run(z, y)), 8)
        count += 1
    return count * n / (time.perf_counter() - started)


def worktree(ref: str) -> Path:
    """A checkout of `ref` beside this one (tests/benchmarks/results/worktree-REF), made once and reused;
    `python -m service` started there imports that commit's service."""
    folder = Path(__file__).resolve().parent / "results" / f"worktree-{ref.replace('/', '_')}"
    if not folder.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref], check=True)
    return folder


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    if not name or not env:
        sys.exit(f"error: --variant {text!r}: expected NAME:VARIABLE=VALUE[,VARIABLE=VALUE]")
    return name, env


def table(results: dict, servers: list[str]) -> str:
    rows = ["| server | request | concurrency | req/s | images/s | p50 ms | p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path, images, concurrency in LOADS:
        for name in servers:
            r = results[name].get(f"{path} c{concurrency}")
            if r is None:
                continue
            rows.append(f"| {name} | `{path}` | {concurrency} | {r['rps']:,.0f} | {r['rps'] * images:,.0f} | "
                        f"{r['p50_ms']:.2f} | {r['p99_ms']:.1f} | {r['errors']} |")
    return "\n".join(rows)


def plot(results: dict, servers: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = [c for p, _, c in LOADS if p == GENERATE]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name in servers:
        ax.plot(levels, [results[name][f"{GENERATE} c{c}"]["rps"] for c in levels], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests/s")
    ax.set_title(f"GET {GENERATE}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="length of each measured run")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before measuring a server")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run; the table gives medians")
    parser.add_argument("--memory-seconds", type=float, default=60, help="0 skips the memory run")
    parser.add_argument("--workers", type=int, help="uvicorn worker processes of every server "
                                                    "(default: the service's own default here)")
    parser.add_argument("--servers", default="baseline,ceiling,service,triton",
                        help="of baseline, ceiling, service, service-granian (the service's app under granian: "
                             "servers/granian_service.py), triton (skipped with a line when not built)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:DIGITGEN_X=V,... another service")
    parser.add_argument("--ref", help="also serve the service as of this git commit (service@REF)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    binary = ensure_wrk()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))

    from service.config import Settings
    from service.plan import make_plan
    args.workers = args.workers or make_plan(Settings()).workers
    service_env = {"DIGITGEN_WORKERS": str(args.workers), "DIGITGEN_MODELS_DIR": str(ROOT / "exported"),
                   "DIGITGEN_GRPC_PORT": ""}  # "": a free port, chosen at start
    service = [sys.executable, "-m", "service"]
    known = {"baseline": Server("baseline", benchmark_app("baseline", args.workers)),
             "ceiling": Server("ceiling", benchmark_app("ceiling", args.workers)),
             "service": Server("service", service, service_env, ready_path="/readyz"),
             "service-granian": Server("service-granian", [sys.executable, str(SERVERS_DIR / "granian_service.py"),
                                                           "--workers", str(args.workers)],
                                       {k: v for k, v in service_env.items() if k != "DIGITGEN_GRPC_PORT"},
                                       ready_path="/readyz")}
    servers = [known[name] for name in args.servers.split(",") if name != "triton"]
    workdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if "triton" in args.servers.split(",") and (triton := triton_server(workdir)):
        servers.append(triton)
    servers += [Server(name, service, service_env | env, ready_path="/readyz") for name, env in map(parse_variant, args.variant)]
    if args.ref:  # its own exported/ (a manifest it can read), no gRPC (the commit may predate it)
        folder = worktree(args.ref)
        servers.append(Server(f"service@{args.ref}", service, {
            "DIGITGEN_WORKERS": str(args.workers), "DIGITGEN_MODELS_DIR": str(folder / "exported")},
            ready_path="/readyz", cwd=folder))
    names = [s.name for s in servers]

    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script, \
            tempfile.NamedTemporaryFile("w", suffix=".lua") as v2_script, \
            tempfile.NamedTemporaryFile("w", suffix=".lua") as v2_batch_script:
        script.write(STATS_LUA)
        script.flush()
        v2_script.write(v2_request_lua() + STATS_LUA)
        v2_script.flush()
        v2_batch_script.write(v2_request_lua(64) + STATS_LUA)
        v2_batch_script.flush()
        revalidate_scripts: dict[str, str] = {}
        try:
            for server in servers:
                start(server)
                if server.name == "triton":
                    wrk(binary, v2_script.name, server.url + V2_INFER, 16, args.warmup)
                    continue
                if server.name not in ("baseline", "ceiling"):
                    tag = urllib.request.urlopen(server.url + REVALIDATE).headers["ETag"]
                    lua = Path(script.name).with_name(f"revalidate-{server.name}.lua")
                    lua.write_text(f"wrk.headers['If-None-Match'] = '{tag}'\n" + STATS_LUA)
                    revalidate_scripts[server.name] = str(lua)
                wrk(binary, script.name, server.url + GENERATE, 16, args.warmup)
                if server.name != "ceiling":
                    wrk(binary, script.name, server.url + SAMPLE, 4, 1)
            runs: dict[tuple[str, str], list[dict]] = {}
            for _ in range(args.rounds):
                for path, _, concurrency in LOADS:
                    for server in servers:
                        if server.name == "ceiling" and path != GENERATE:
                            continue  # the ceiling is the HTTP limit for one small image
                        if path in V2_LOADS | {REVALIDATE} and server.name == "baseline":
                            continue  # it speaks no V2 and sends no ETags
                        if server.name == "triton" and path not in V2_LOADS:
                            continue  # Triton speaks V2 only
                        if path in (GRPC_INFER, GRPC_CLIENTS) and not server.grpc_port:
                            continue
                        key = f"{path} c{concurrency}"
                        if path in (GRPC_INFER, GRPC_CLIENTS):
                            run = grpc_run(f"127.0.0.1:{server.grpc_port}", concurrency, args.seconds,
                                           4 if path == GRPC_CLIENTS else 1)
                        else:
                            scripts = {V2_INFER: v2_script.name, V2_BATCH: v2_batch_script.name}
                            lua = revalidate_scripts[server.name] if path == REVALIDATE else \
                                scripts.get(path, script.name)
                            run = wrk(binary, lua, server.url + path.split(" ")[0], concurrency, args.seconds)
                        runs.setdefault((server.name, key), []).append(run)
                        print(f"{server.name:10} {key:28} {run['rps']:8.0f} req/s  p50 {run['p50_ms']:6.2f} ms  "
                              f"p99 {run['p99_ms']:6.1f} ms  errors {run['errors']}", flush=True)
            for (name, key), measured in runs.items():
                results[name][key] = {k: statistics.median(r[k] for r in measured) for k in measured[0]}
            for server in servers:
                if server.name != "service":
                    stop(server)
            memory = None
            main_service = next((s for s in servers if s.name == "service"), None)
            if args.memory_seconds and main_service:
                before = rss_bytes(main_service.process.pid)
                run = wrk(binary, script.name, main_service.url + GENERATE, 64, args.memory_seconds)
                after = rss_bytes(main_service.process.pid)
                memory = {"seconds": args.memory_seconds, "rss_before_mib": before / 2**20,
                          "rss_after_mib": after / 2**20, "growth": after / before - 1, "rps": run["rps"],
                          "errors": run["errors"]}
        finally:
            for server in servers:
                stop(server)
            for lua in revalidate_scripts.values():
                Path(lua).unlink(missing_ok=True)

    limits = {n: in_process_limit(n, args.seconds / 2) for n in (1, 64)}
    print()
    print(table(results, names))
    print(f"\nin-process limit (ONNX Runtime + PNG encoding, no HTTP): n=1 {limits[1]:,.0f} images/s, "
          f"n=64 {limits[64]:,.0f} images/s")
    if "service" in results:
        s, c64 = results["service"], f"{GENERATE} c64"
        lines = []
        if "baseline" in results:
            lines.append(f"/generate c64: {s[c64]['rps'] / results['baseline'][c64]['rps']:.2f}x the baseline's req/s "
                         f"(target >= 2.5x)")
        if "ceiling" in results:
            lines.append(f"/generate c64: {s[c64]['rps'] / results['ceiling'][c64]['rps']:.0%} of the ceiling "
                         f"(target >= 50%); p99 {s[c64]['p99_ms']:.1f} ms (target <= 50)")
        lines.append(f"/generate c1: p50 {s[f'{GENERATE} c1']['p50_ms']:.2f} ms (target <= 2)")
        if "ceiling" in results:
            lines.append(f"304 revalidation c64: {s[f'{REVALIDATE} c64']['rps'] / results['ceiling'][c64]['rps']:.0%} "
                         f"of the ceiling's req/s; p99 {s[f'{REVALIDATE} c64']['p99_ms']:.1f} ms")
        lines.append(f"V2 infer (binary, one image) c64: {s[f'{V2_INFER} c64']['rps'] / s[c64]['rps']:.2f}x "
                     f"/generate's req/s; p99 {s[f'{V2_INFER} c64']['p99_ms']:.1f} ms")
        lines.append(f"/sample?n=64: {s[f'{SAMPLE} c16']['rps'] * 64 / limits[64]:.0%} of the in-process "
                     f"images/s (target >= 80%)")
        if "triton" in results:
            t = results["triton"]
            v1, v64, g64 = f"{V2_INFER} c1", f"{V2_INFER} c64", f"{GRPC_INFER} c64"
            if "service-granian" in results:
                g = results["service-granian"]
                lines.append(f"under granian: V2 infer c64 {g[v64]['rps'] / t[v64]['rps']:.2f}x Triton's req/s "
                             f"({g[v64]['rps'] / s[v64]['rps']:.2f}x uvicorn's), p50 c1 {g[v1]['p50_ms'] / t[v1]['p50_ms']:.2f}x "
                             f"Triton's ({g[v1]['p50_ms'] / s[v1]['p50_ms']:.2f}x uvicorn's); /generate c64 "
                             f"{g[c64]['rps'] / s[c64]['rps']:.2f}x uvicorn's req/s, p99 {g[c64]['p99_ms']:.1f} ms")
            lines.append(f"V2 infer c64 against Triton: {s[v64]['rps'] / t[v64]['rps']:.2f}x its req/s (target >= 1.0x); "
                         f"p99 {s[v64]['p99_ms']:.1f} ms against {t[v64]['p99_ms']:.1f} (target <= Triton's + 10)")
            lines.append(f"V2 infer c1: p50 {s[v1]['p50_ms']:.2f} ms against Triton's {t[v1]['p50_ms']:.2f} "
                         f"({s[v1]['p50_ms'] / t[v1]['p50_ms']:.2f}x, target <= 1.2x)")
            lines.append(f"V2 infer, 64 images a request, c16: {s[f'{V2_BATCH} c16']['rps'] / t[f'{V2_BATCH} c16']['rps']:.2f}x "
                         f"Triton's req/s")
            if g64 in s and g64 in t:
                lines.append(f"gRPC infer c64: {s[g64]['rps'] / t[g64]['rps']:.2f}x Triton's gRPC req/s (target >= 0.8x), "
                             f"{s[g64]['rps'] / s[v64]['rps']:.2f}x our HTTP V2")
            c4 = f"{GRPC_CLIENTS} c64"
            if c4 in s and c4 in t:
                lines.append(f"gRPC infer c64 over 4 connections: {s[c4]['rps'] / t[c4]['rps']:.2f}x Triton's req/s")
        for name in names:
            if name.startswith("service@"):
                ratios = ", ".join(f"{path} c{c} {s[f'{path} c{c}']['rps'] / results[name][f'{path} c{c}']['rps']:.2f}x"
                                   for path, _, c in LOADS if f"{path} c{c}" in results[name])
                lines.append(f"against {name} (req/s, this tree / that commit): {ratios}")
        if memory:
            lines.append(f"memory: RSS {memory['rss_before_mib']:.0f} -> {memory['rss_after_mib']:.0f} MiB "
                         f"({memory['growth']:+.1%}) over {memory['seconds']:.0f} s at c64, "
                         f"{memory['rps']:,.0f} req/s, {memory['errors']} errors (target < +10%)")
        print("\n".join(lines))
    machine = {"cpu": _cpu_name(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
               "onnxruntime": _version("onnxruntime-gpu") or _version("onnxruntime"), "uvicorn": _version("uvicorn"),
               "fastapi": _version("fastapi"),
               "uvloop": _version("uvloop"), "httptools": _version("httptools"), "workers": args.workers}
    print(f"machine: {json.dumps(machine)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "seconds": args.seconds, "rounds": args.rounds, "results": results,
              "in_process_images_per_s": limits, "memory": memory}
    (args.out / "serve_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, [n for n in ("baseline", "ceiling", "service") if n in results], args.out / "serve_throughput.png")
    print(f"wrote {args.out / 'serve_throughput.json'} and {args.out / 'serve_throughput.png'}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
