"""Deployment files, checked without a container engine: hadolint on the Dockerfile, its HEALTHCHECK and
requirement list run here, structure of the compose file. `make image-test` builds and runs the images."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> str:
    """The Dockerfile with its line continuations joined, as Docker reads it."""
    return (ROOT / "Dockerfile").read_text().replace("\\\n", "")


def hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is installed by the dev extra on Linux x86-64 only")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_service_non_root_with_a_home():
    text = dockerfile()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert stages == ["build", "cuda", "cpu"]  # cpu last: the default target
    assert text.count("USER 10001") == 2 and text.count("useradd --system --uid 10001 --create-home app") == 2
    assert text.count("COPY exported /app/exported") == 2
    assert "torch" not in text.replace("no torch", "")


class Readyz(BaseHTTPRequestHandler):
    """GET /readyz answers the server's `status`."""

    def do_GET(self):
        self.send_response(self.server.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_each_healthcheck_probes_readyz_at_digitgen_port(status, healthy):
    """Run as the image runs it, with DIGITGEN_PORT set to where a stand-in /readyz answers `status`."""
    commands = [json.loads(command) for command in re.findall(r"^HEALTHCHECK .* CMD (\[.*\])$", dockerfile(), re.M)]
    assert len(commands) == 2 and all(command[0] == "python" for command in commands)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Readyz)
    server.status = status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for command in commands:
            result = subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=10,
                                    env={**os.environ, "DIGITGEN_PORT": str(server.server_address[1])})
            assert (result.returncode == 0) == healthy, result.stderr
    finally:
        server.shutdown()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the image's Python reads pyproject.toml with tomllib (3.11+)")
def test_cpu_image_requirements_are_the_dependencies_with_onnxruntimes_cpu_build():
    """The build stage's list: pyproject.toml's dependencies, the CPU build of ONNX Runtime alone in place of
    the GPU one (both are the `onnxruntime` module, so never both in one environment)."""
    import tomllib
    code = re.search(r'^RUN python -c "(.*?)" > requirements.txt', dockerfile(), re.M).group(1)
    listed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    onnxruntime = [line for line in listed if line.startswith("onnxruntime")]
    assert len(onnxruntime) == 1 and re.fullmatch(r"onnxruntime[<>=~!][^;]*", onnxruntime[0])  # no marker
    assert [line for line in listed if line not in onnxruntime] == [
        dep for dep in dependencies if not dep.startswith("onnxruntime")]


def test_cuda_image_matches_the_cuda_major_of_onnxruntime_gpu():
    """onnxruntime-gpu 1.27+ is built for CUDA 13 and cuDNN 9."""
    image = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.\S*cudnn", (ROOT / "Dockerfile").read_text())
    assert image and image.group(1) == "13"


def test_compose_serves_on_8000_with_the_images_healthcheck_and_a_gpu_profile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cpu, gpu = compose["services"]["digit-gen"], compose["services"]["digit-gen-gpu"]
    assert cpu["ports"] == ["${DIGITGEN_PORT:-8000}:8000"] and "profiles" not in cpu
    for service in (cpu, gpu):
        assert "healthcheck" not in service  # the image's, which follows DIGITGEN_PORT
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert set(compose) == {"services"}
