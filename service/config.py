"""The service's settings, read once: flags of `python -m service` or DIGITGEN_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (affinity, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIGITGEN_", protected_namespaces=())

    models_dir: Path = Field(Path("exported"), description="folder with manifest.json and the ONNX files")
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when ONNX Runtime can use it, else CPU; cuda: CUDA or a warned fallback")
    intra_op_threads: int = Field(default_factory=available_cpus, ge=1,
                                  description="ONNX Runtime threads per inference (default: the CPUs available)")
    inference_threads: int = Field(2, ge=1, description="inferences that may run at once, off the event loop")
    max_n: int = Field(64, ge=1, description="largest n of /sample and /generate")
    max_steps: int = Field(64, ge=2, description="largest steps of /interpolate")
    max_scale: int = Field(8, ge=1, description="largest upscaling factor")
    cors_origins: list[str] = Field(default_factory=list,
                                    description='origins allowed by CORS, e.g. ["http://localhost:3000"] or ["*"]')
    log_level: Literal["debug", "info", "warning", "error"] = "info"
