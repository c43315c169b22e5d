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
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def nvidia_driver_present() -> bool:
    """Is there an NVIDIA driver to talk to? Without one the CUDA provider cannot start, and trying
    prints a screen of ONNX Runtime errors per session."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(setting: str, available: list[str], driver: bool, quiet: bool = False) -> list:
    """The provider list to ask ONNX Runtime for: CUDA first when wanted and usable, CPU always last."""
    if setting != "cpu" and CUDA in available and (driver or setting == "cuda"):
        return [(CUDA, CUDA_OPTIONS), CPU]
    if setting != "cpu" and not quiet:
        why = "no NVIDIA driver" if CUDA in available else f"this ONNX Runtime has no CUDA provider ({', '.join(available)})"
        log.warning("providers=%s: %s; using the CPU", setting, why)
    return [CPU]


def cuda_chosen(setting: str) -> bool:
    """Will the models run on CUDA with this providers setting (given ONNX Runtime and the driver here)?"""
    first = choose_providers(setting, ort.get_available_providers(), nvidia_driver_present(), quiet=True)[0]
    return first != CPU


def plan(settings: Settings) -> Settings:
    """The settings with the worker count and ONNX Runtime threads decided: workers x threads = the CPUs.
    On the CPU one process per core beats one process with more threads (the event loop, not the model,
    saturates first: make bench-serve); a GPU does the model's work for every worker, so one worker
    batches best there."""
    if settings.workers is not None and settings.intra_op_threads is not None:
        return settings
    workers = settings.workers or (1 if cuda_chosen(settings.providers) else available_cpus())
    threads = settings.intra_op_threads or max(1, available_cpus() // workers)
    return settings.model_copy(update={"workers": workers, "intra_op_threads": threads})
