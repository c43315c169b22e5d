"""Two replicas of the CPU image behind HAProxy, on one shared models volume, reloaded under load.

Run by tests/image/image_test.sh (`make image-test`) with the image built. The containers run as the CPU
overlay's Deployment says (deploy/k8s/cpu-models-volume, rendered by tests/kustomize.py): its user, its
read-only root with a writable /tmp, no capabilities, its settings, the models volume mounted read-only at
DIGITGEN_MODELS_DIR and seeded by the init container's own command. Then, while clients send requests
through the load balancer without pause:
  1. a new model set is published onto the volume with `python -m service copy-models`, run in the image;
  2. each replica gets the reload the README documents (`sh -c 'kill -HUP 1'` in the container);
  3. both must serve the new set (generation 2, the retired model gone), and no request may have failed.

    python tests/image/two_replicas.py IMAGE     prints "ok: ..." lines; exit status 1 on the first failure
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kustomize import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
READY_S = 120
CLIENTS = 6
HAPROXY_CONFIG = """global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 0
frontend digit-gen
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Served-By %s
{servers}
"""


class Failed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def podman(*args: str) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise Failed(f"podman {' '.join(args)}: {result.stderr.strip()[-800:]}")
    return result.stdout.strip()


def deployed_pod() -> tuple[dict, dict]:
    """The server container and the init container of the overlay with the models volume."""
    deployment = next(o for o in render(ROOT / "deploy/k8s/cpu-models-volume") if o["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    return spec, spec["initContainers"][0]


def security_flags(spec: dict, container: dict) -> list[str]:
    """podman's words for the pod's security context and the container's."""
    pod, own = spec["securityContext"], container["securityContext"]
    flags = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    if own.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]  # only what the pod mounts is writable
    if own.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    flags += [f"--cap-drop={c}" for c in own.get("capabilities", {}).get("drop", [])]
    return flags


def start_replicas(image: str, volume: Path, spec: dict, count: int) -> list[tuple[str, str]]:
    container = next(c for c in spec["containers"] if c["name"] == "digit-gen")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    replicas = []
    for index in range(count):
        port, grpc_port = free_port(), free_port()
        settings = env | {"DIGITGEN_HOST": "127.0.0.1", "DIGITGEN_PORT": str(port), "DIGITGEN_GRPC_PORT": str(grpc_port),
                          "DIGITGEN_LOG_FORMAT": "text"}
        flags = ["--network", "host", "--cpus", str(container["resources"]["limits"]["cpu"]), "--no-healthcheck",
                 "--memory", container["resources"]["limits"]["memory"].replace("Gi", "g"),
                 "--name", f"digit-gen-replica-{index}-{port}",
                 "--mount", f"type=tmpfs,destination={mounts['tmp']['mountPath']},tmpfs-size=512m,tmpfs-mode=1777",
                 "--volume", f"{volume}:{mounts['models']['mountPath']}:ro"]
        flags += [f"--env={k}={v}" for k, v in settings.items()]
        replicas.append((podman("run", "--detach", *flags, *security_flags(spec, container), image),
                         f"http://127.0.0.1:{port}"))
    return replicas


def wait_ready(url: str, generation: int | None = None) -> dict:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        try:
            status, _, body = get(url + "/readyz", timeout=2)
            ready = json.loads(body)
            if status == 200 and (generation is None or ready["generation"] == generation):
                return ready
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise Failed(f"{url}/readyz: not ready{f' at generation {generation}' if generation else ''} within {READY_S} s")


def served_by(balancer: str) -> set[str]:
    """The replicas that answered six requests through the balancer (none while it is starting)."""
    try:
        return {get(balancer + "/readyz")[1].get("x-served-by", "") for _ in range(6)} - {""}
    except OSError:
        return set()


def retired_set(models_dir: Path, staging: Path) -> str:
    """A copy of the set without one model that serves no default: the new set to publish; its name."""
    manifest = json.loads((models_dir / "manifest.json").read_text())
    defaults = set(manifest.get("defaults", {}).values())
    names = [m["name"] for m in manifest["models"]]
    retired = next(n for n in reversed(names) if n not in defaults)
    manifest["models"] = [m for m in manifest["models"] if m["name"] != retired]
    manifest.get("rollouts", {}).pop(retired, None)
    shutil.copytree(models_dir, staging)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return retired


class Load:
    """Clients sending GET /generate through the load balancer without pause, counting every answer."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.answers: Counter = Counter()
        self.served_by: Counter = Counter()
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(CLIENTS)]

    def client(self, index: int) -> None:
        while not self.stop.is_set():
            try:
                status, headers, _ = get(f"{self.url}/generate?digit={index % 10}&n=4")
                self.answers[status] += 1
                self.served_by[headers.get("x-served-by")] += 1
            except OSError as err:
                self.answers[f"error: {err}"] += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def main(image: str) -> None:
    if not shutil.which("haproxy"):
        raise Failed("haproxy is not installed (Debian's package haproxy)")
    spec, init = deployed_pod()
    work = Path(tempfile.mkdtemp(prefix="digit-gen-replicas-"))
    containers: list[str] = []
    haproxy = None
    try:
        volume = work / "models"
        volume.mkdir()
        os.chown(volume, spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"])
        seed = [f"--volume={volume}:{init['volumeMounts'][0]['mountPath']}"] + security_flags(spec, init)
        podman("run", "--rm", "--network", "none", "--no-healthcheck", *seed, image, *init["command"])
        print(f"ok: the init container's command seeded the volume ({len(list(volume.rglob('*.onnx')))} ONNX files)")

        replicas = start_replicas(image, volume, spec, 2)
        containers += [c for c, _ in replicas]
        for _, url in replicas:
            wait_ready(url, 1)
        for path in ("/app/exported/written", "/models/written", "/home/app/written"):
            if subprocess.run(["podman", "exec", containers[0], "sh", "-c", f": > {path}"],
                              capture_output=True).returncode == 0:
                raise Failed(f"{path}: writable in the container, though the pod spec makes it read-only")
        scrape = get(replicas[0][1] + "/metrics")[2].decode()
        workers = len([line for line in scrape.splitlines() if line.startswith("digitgen_process_threads")])
        if workers != int(spec["containers"][0]["resources"]["limits"]["cpu"]):
            raise Failed(f"{workers} worker(s) under the pod's CPU limit, {spec['containers'][0]['resources']}")
        print(f"ok: two replicas ready at generation 1, {workers} workers each under the pod's CPU limit, with the "
              f"root file system and the volume read-only")

        port = free_port()
        servers = "\n".join(f"    server replica{i} {url.removeprefix('http://')} check inter 500ms"
                            for i, (_, url) in enumerate(replicas))
        (work / "haproxy.cfg").write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(work / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        balancer = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while len(served_by(balancer)) < 2:
            if haproxy.poll() is not None:
                raise Failed(f"haproxy exited: {haproxy.stderr.read()[-800:] if haproxy.stderr else ''}")
            if time.monotonic() > deadline:
                raise Failed("haproxy never sent requests to both replicas")
            time.sleep(0.5)

        staging = work / "staging"
        retired = retired_set(ROOT / "exported", staging)
        with Load(balancer) as load:
            time.sleep(2)
            before = sum(load.answers.values())
            podman("run", "--rm", "--network", "none", "--no-healthcheck", f"--volume={staging}:/staging:ro",
                   f"--volume={volume}:/models", *security_flags(spec, init), image,
                   "python", "-m", "service", "copy-models", "/models", "--models-dir", "/staging")
            for container, _ in replicas:
                podman("exec", container, "sh", "-c", "kill -HUP 1")
            for _, url in replicas:
                wait_ready(url, 2)
            time.sleep(2)
        for index, (_, url) in enumerate(replicas):
            models = json.loads(get(url + "/models")[2])
            names = {m["name"] for m in models["models"]}
            if models["generation"] != 2 or retired in names:
                raise Failed(f"replica {index}: generation {models['generation']}, models {sorted(names)}")
        print(f"ok: both replicas serve the new set (generation 2, {retired} retired) after copy-models and "
              f"a SIGHUP each")
        failed = {k: v for k, v in load.answers.items() if k != 200}
        total = sum(load.answers.values())
        if failed or total - before < 50:
            raise Failed(f"answers through haproxy: {dict(load.answers)}")
        print(f"ok: {total} requests through haproxy during the publish and the reloads, none failed "
              f"(served by {dict(load.served_by)})")
        if min(load.served_by.values()) < total / 10 or len(load.served_by) < 2:
            raise Failed(f"the load was not shared by both replicas: {dict(load.served_by)}")
        for container, _ in replicas:  # ONNX Runtime's own lines start [W:onnxruntime or [E:onnxruntime
            logs = subprocess.run(["podman", "logs", container], capture_output=True, text=True)
            noisy = [line for line in (logs.stdout + logs.stderr).splitlines()
                     if re.search(r"warn|error|\[[WE]:", line, flags=re.I)]
            if noisy:
                raise Failed(f"a replica logged, with its root file system read-only: {noisy[:3]}")
        print("ok: no warning or error in either replica's log")
    finally:
        if haproxy:
            haproxy.terminate()
            haproxy.wait(10)
        for container in containers:
            subprocess.run(["podman", "rm", "--force", "--time", "10", container], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Failed as failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        sys.exit(1)
