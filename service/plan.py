"""What this machine gets, decided once from the settings: worker processes, ONNX Runtime threads, the
providers each process opens its sessions on, the GPU arena cap, and whether one inference process holds
the sessions (service/inference/). `Settings` is what the user asked for; a `Plan` is what the program
found, computed once in `python -m service` (or `create_app` alone) and handed down as a value."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnxruntime as ort

from service.config import Settings, available_cpus
from service.providers import CPU, choose_providers, nvidia_driver_present

# The arenas' budget: the inference process's, or shared out among per-worker sessions. The rest of a CUDA
# process is not capped (tests/benchmarks/results/gpu_serve*.json).
GPU_MEMORY_BUDGET_MB = 6144
MIN_ARENA_MB = 256


@dataclass(frozen=True)
class Plan:
    workers: int
    intra_op_threads: int
    gpu_mem_limit_mb: int | None
    device_providers: tuple  # CUDA (with its options) first when usable, CPU last: the best this machine offers
    inference_process: bool  # one process holds the sessions on device_providers; workers keep CPU ones
    inference_socket: Path | None = None  # where that process listens: set once it does

    @property
    def worker_providers(self) -> list:
        """What a worker opens its own sessions on: the CPU when the inference process holds the device's."""
        return [CPU] if self.inference_process else list(self.device_providers)

    def listening_at(self, socket: Path) -> Plan:
        return replace(self, inference_socket=socket)


def cuda_chosen(setting: str) -> bool:
    """Will the models run on CUDA with this providers setting (given ONNX Runtime and the driver here)?"""
    return choose_providers(setting, ort.get_available_providers(), nvidia_driver_present(), quiet=True)[0] != CPU


def make_plan(settings: Settings, quiet: bool = False) -> Plan:
    """Workers x threads = the CPUs, on CUDA too: one process per core beats one process with more threads
    (the event loop, the HTTP work and the encoding saturate before the model: make bench-serve), and on a
    GPU machine one worker left the GPU idle while it did all the HTTP and PNG work. The arenas share
    GPU_MEMORY_BUDGET_MB: the inference process has it all, else the workers share it out."""
    workers = settings.workers or available_cpus()
    threads = settings.intra_op_threads or max(1, available_cpus() // workers)
    cuda = cuda_chosen(settings.providers)
    process = settings.inference_process == "on" or (
        settings.inference_process == "auto" and cuda and workers > 1 and settings.gpu_sessions == "shared")
    arena = settings.gpu_mem_limit_mb
    if arena is None and cuda:
        arena = GPU_MEMORY_BUDGET_MB if process else max(MIN_ARENA_MB, GPU_MEMORY_BUDGET_MB // workers)
    providers = choose_providers(settings.providers, ort.get_available_providers(), nvidia_driver_present(), quiet,
                                 arena)
    return Plan(workers, threads, arena, tuple(providers), process)
