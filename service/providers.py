"""Which ONNX Runtime execution providers can run the models here: CUDA when it can work, else the CPU.
The plan (service/plan.py) asks once and hands the answer down."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("digitgen.providers")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# cuDNN's EXHAUSTIVE search re-benchmarks every new batch size (hundreds of ms each); HEURISTIC does not.
# Each session's arena grows by what is asked for, not by doubling, up to gpu_mem_limit.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}


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
