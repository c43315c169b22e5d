"""Which ONNX Runtime execution providers the models run on: CUDA when it can work here, else the CPU.

Depends on ONNX Runtime only, so both the settings (the default worker count) and the registry (the
sessions) can ask it, and neither imports the other for it.
"""

from __future__ import annotations

import ctypes
import logging

import onnxruntime as ort

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
