"""The number format a device computes in: bf16 autocast where the hardware runs bf16 natively, float32
elsewhere. One choice for the trainers and the evaluator alike."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """CUDA, or a CPU whose oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than float32."""
    if device.type == "cuda":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device: torch.device, wanted: bool = True) -> torch.autocast:
    """bf16 autocast on `device` when `wanted` and native there; otherwise a disabled one (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=wanted and native_bf16(device))
