"""The service's settings, read once: flags of `python -m service` or DIGITGEN_* environment variables."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (`docker run --cpus`, cgroup v2
    or v1), which affinity does not show."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpu_quota(v2: Path = Path("/sys/fs/cgroup/cpu.max"), v1: Path = Path("/sys/fs/cgroup/cpu")) -> int | None:
    """ceil(quota / period), or None when unlimited or unreadable: from cgroup v2's cpu.max ("max 100000" when
    unlimited), else from cgroup v1's cpu.cfs_quota_us (-1 when unlimited) and cpu.cfs_period_us."""
    try:
        if v2.exists():
            fields = v2.read_text().split()
        else:
            fields = [(v1 / name).read_text() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return -(-quota // period) if quota > 0 and period > 0 else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIGITGEN_", protected_namespaces=())

    models_dir: Path = Field(Path("exported"), description="folder with manifest.json and the ONNX files")
    host: str = Field("127.0.0.1", description="interface the HTTP (and gRPC) server binds; 0.0.0.0 in a container")
    grpc_port: int | None = Field(None, ge=1, le=65535, description="port of the Open Inference Protocol over gRPC "
                                                                    "(inference.GRPCInferenceService); unset: off")
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when ONNX Runtime can use it, else CPU; cuda: CUDA or a warned fallback")
    workers: int | None = Field(None, ge=1, description="uvicorn worker processes, each with every model. "
                                                         "Default: one per available CPU, on CUDA too "
                                                         "(service/providers.py: plan)")
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per inference. Default: "
                                                                 "the available CPUs shared out among the workers")
    gpu_sessions: Literal["shared", "per-worker"] = Field(
        "shared", description="on CUDA with several workers: shared: one inference process holds the GPU sessions "
                              "and the workers hand it their batches (service/inference/); per-worker: each "
                              "worker opens its own")
    inference_process: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: the inference process runs when the GPU sessions are shared (CUDA, several "
                            "workers, gpu_sessions=shared); on: always, on the planned provider (the CPU without a "
                            "GPU: the same path, for tests and CI); off: never")
    gpu_batches_in_flight: int = Field(4, ge=1, le=64, description="with the inference process: batches each model of "
                                                                  "a worker may have in it at once")
    gpu_deadline_min_ms: float = Field(500.0, gt=0, description="least time a batch gets in the inference process "
                                                                "before the worker runs it on its own CPU session; "
                                                                "otherwise 8x that batch size's measured time")
    inference_deadline_s: float = Field(5.0, gt=0, description="the inference process must answer its heartbeat and "
                                                              "finish every batch within this, or it is replaced")
    gpu_mem_limit_mb: int | None = Field(None, ge=64, description="cap of each model session's ONNX Runtime CUDA arena "
                                                                  "(in the inference process or each worker). Default: 6144 MB, "
                                                                  "per-worker: shared out among the workers "
                                                                  "(at least 256 each)")
    encode_threads: int = Field(2, ge=1, description="threads that encode responses (PNG, GIF, JSON) off the event loop")
    batch_max_size: int = Field(64, ge=1, description="most images per ONNX Runtime call when requests are "
                                                       "batched; a single larger request runs alone")
    batch_max_wait_ms: float = Field(0.0, ge=0, le=1000,
                                     description="how long a batch may wait for more requests once one is queued; "
                                                 "0: batch only what queued while the model was busy")
    max_queued: int = Field(256, ge=1, description="requests waiting per model beyond which the service answers "
                                                   "503 with Retry-After")
    max_n: int = Field(64, ge=1, description="largest n of /sample and /generate")
    max_steps: int = Field(64, ge=2, description="largest steps of /interpolate")
    max_scale: int = Field(8, ge=1, description="largest upscaling factor")
    max_body_bytes: int | None = Field(None, ge=1024, description="largest request body; a larger one is a 413 "
                                                                   "before it is parsed. Default: what max_n images "
                                                                   "of the widest model's inputs take as JSON")
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for its model and "
                                                             "encoding before a 504")
    max_request_line_bytes: int = Field(8192, ge=256, description="a longer request line (method, URL, version) "
                                                                  "is a 414, refused as the bytes arrive")
    max_header_bytes: int = Field(32768, ge=1024, description="larger headers (all of them) are a 431")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection whose request head has not arrived this "
                                                            "long after it opened (or after its last response and "
                                                            "keep-alive) is answered 408 and closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body that stalls this long between two reads "
                                                          "is answered 408 and its connection closed")
    max_connections: int = Field(4096, ge=1, description="connections per worker; a new one past it is answered "
                                                         "503 and closed at once")
    quality_gate: bool = Field(True, description="before a model is served (start-up, reload), score seeded samples "
                                                 "with its judge and leave it out when they fall short of the "
                                                 "figures its manifest entry records; off: serve it unchecked")
    gate_cache_dir: Path | None = Field(None, description="where the quality gate's measurements are remembered, by "
                                                         "the file, the judge and ONNX Runtime that determine them, "
                                                         "so a restart or a repeated reload does not gate again. "
                                                         "Default: $XDG_CACHE_HOME/digit-gen/gates (~/.cache/...); "
                                                         "unwritable: remembered in memory only")
    cors_origins: list[str] = Field(default_factory=list,
                                    description='origins allowed by CORS, e.g. ["http://localhost:3000"] or ["*"]')

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, origins: list[str]) -> list[str]:
        """An origin is scheme://host[:port] (what a browser sends), or "*": "localhost:3000" would match
        no browser and fail silently."""
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port], e.g. http://localhost:3000")
        return origins

    api_keys_file: Path | None = Field(None, description="file of `NAME SHA256_OF_THE_KEY` lines: when set, the "
                                                           "model endpoints need one of those keys")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(False, description="log one line per request: request id, method, path, status, "
                                                "latency, and the model, version and queue wait of a model's")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line, with "
                                                                    "the worker and, for requests, their fields")
