"""Deployment files, checked without a Docker engine: hadolint on the Dockerfile, structure of the
compose file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
READYZ = "http://127.0.0.1:8000/readyz"


def hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is installed by the dev extra on Linux x86-64 only")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_service_non_root_with_a_readiness_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert stages == ["build", "cuda", "cpu"]  # cpu last: the default target
    assert text.count("USER 10001") == 2 and text.count(READYZ) == 2
    assert text.count("COPY exported /app/exported") == 2
    assert "torch" not in text.replace("no torch", "")


def test_cuda_image_matches_the_cuda_major_of_onnxruntime_gpu():
    """onnxruntime-gpu 1.27+ is built for CUDA 13 and cuDNN 9."""
    image = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.\S*cudnn", (ROOT / "Dockerfile").read_text())
    assert image and image.group(1) == "13"


def test_compose_serves_on_8000_with_a_healthcheck_and_a_gpu_profile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cpu, gpu = compose["services"]["digit-gen"], compose["services"]["digit-gen-gpu"]
    assert cpu["ports"] == ["${DIGITGEN_PORT:-8000}:8000"] and "profiles" not in cpu
    for service in (cpu, gpu):
        assert READYZ in " ".join(service["healthcheck"]["test"])
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert set(compose) == {"services"}
