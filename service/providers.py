"""Which ONNX Runtime execution providers the models run on: CUDA when it can work here, else the CPU.

The settings (service/config.py) import nothing of ONNX Runtime; `plan` fills in what depends on the
device here (worker processes, ONNX Runtime threads) where the workers are planned, and the model set
asks `choose_providers` for its sessions.
"""

from __future__ import annotations

import ctypes
import logging

import onnxruntime as ort

from service.config import Settings, available_cpus

log = logging.getLogger("digitgen.providers")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# cuDNN's EXHAUSTIVE search re-benchmarks every new batch size (hundreds of ms each); HEURISTIC does not.
# Each session's arena grows by what is asked for, not by doubling, up to gpu_mem_limit.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
# The arenas' budget: the inference process's, or shared out among per-worker sessions. The rest of a CUDA
# process is not capped: on an H200, 16 per-worker processes held 32.6 GB (arenas capped at 384 MB each), the
# one inference process 2.4-4.3 GB with every bundled model (tests/benchmarks/results/gpu_serve*.json).
GPU_MEMORY_BUDGET_MB = 6144
MIN_ARENA_MB = 256


def nvidia_driver_present() -> bool:
    """Is there an NVIDIA driver to talk to? Without one the CUDA provider cannot start, and trying
    prints a screen of ONNX Runtime errors per session."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(setting: str, available: list[str], driver: bool, quiet: bool = False,
                     gpu_mem_limit_mb: int | None = None) -> list:
    """The provider list to ask ONNX Runtime for: CUDA first when wanted and usable (its arena capped at
    gpu_mem_limit_mb), CPU always last."""
    if setting != "cpu" and CUDA in available and (driver or setting == "cuda"):
        options = CUDA_OPTIONS | ({"gpu_mem_limit": str(gpu_mem_limit_mb * 2**20)} if gpu_mem_limit_mb else {})
        return [(CUDA, options), CPU]
    if setting != "cpu" and not quiet:
        why = "no NVIDIA driver" if CUDA in available else f"this ONNX Runtime has no CUDA provider ({', '.join(available)})"
        log.warning("providers=%s: %s; using the CPU", setting, why)
    return [CPU]


def session_providers(settings: Settings, quiet: bool = False) -> list:
    """The providers of the sessions this process opens: the CPU alone in a worker whose GPU sessions are
    the inference process's (settings.gpu_process), else choose_providers' list with the planned arena cap."""
    if settings.gpu_process is not None:
        return [CPU]
    return choose_providers(settings.providers, ort.get_available_providers(), nvidia_driver_present(), quiet,
                            settings.gpu_mem_limit_mb)


def cuda_chosen(setting: str) -> bool:
    """Will the models run on CUDA with this providers setting (given ONNX Runtime and the driver here)?"""
    first = choose_providers(setting, ort.get_available_providers(), nvidia_driver_present(), quiet=True)[0]
    return first != CPU


def plan(settings: Settings) -> Settings:
    """The settings with the worker count, ONNX Runtime threads and (on CUDA) each worker's GPU arena
    decided. Workers x threads = the CPUs, on CUDA too: one process per core beats one process with more
    threads (the event loop, the HTTP work and the encoding saturate before the model: make bench-serve),
    and on a GPU machine one worker left the GPU idle while it did all the HTTP and PNG work (a fifth of
    the CPU mode's images/s on an H200, against 4x with 16 workers). The arenas share GPU_MEMORY_BUDGET_MB:
    the inference process has it all when the GPU sessions are shared, else the workers share it out."""
    workers = settings.workers or available_cpus()
    threads = settings.intra_op_threads or max(1, available_cpus() // workers)
    arena = settings.gpu_mem_limit_mb
    if arena is None and cuda_chosen(settings.providers):
        arena = GPU_MEMORY_BUDGET_MB if settings.gpu_sessions == "shared" and workers > 1 else \
            max(MIN_ARENA_MB, GPU_MEMORY_BUDGET_MB // workers)
    return settings.model_copy(update={"workers": workers, "intra_op_threads": threads, "gpu_mem_limit_mb": arena})


def shares_gpu(settings: Settings) -> bool:
    """Does this (planned) service run its models in one inference process (service/gpu_process.py)?
    Only on CUDA, and only with several workers: one worker holds one set of sessions anyway."""
    return settings.gpu_sessions == "shared" and (settings.workers or 1) > 1 and cuda_chosen(settings.providers)
