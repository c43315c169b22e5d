"""Which device runs a batch: on a GPU machine, small batches of some models are faster on the CPU.

Measured on an H200 (ONNX Runtime 1.27, one CPU thread against the CUDA provider): vae at batch 1 took
1,086 us on CUDA and 307 us on the CPU, yet at batch 64 CUDA was 4x faster; cgan was faster on CUDA at
every size (176 against 345 us at batch 1). The crossover depends on the model and the machine, so it is
measured, not configured: when a model's session runs on CUDA, warm-up times both sessions at each batch
size the service serves and keeps the CPU for the sizes where it wins.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from typing import Callable

import numpy as np

from service.providers import CPU

TIMING_RUNS = 5  # per session and batch size, after one untimed run; the median is kept


def batch_sizes(max_n: int) -> list[int]:
    """The sizes warm-up times: powers of two up to max_n, and max_n."""
    sizes, n = [], 1
    while n < max_n:
        sizes.append(n)
        n *= 2
    return sizes + [max_n]


def cpu_up_to(cpu_seconds: Callable[[int], float], gpu_seconds: Callable[[int], float], sizes: list[int]) -> int:
    """The largest batch size up to which the CPU is faster at every size timed (0: never). A batch of n
    images then runs on the CPU when n <= it: one crossover, so a noisy size past it cannot split the
    range."""
    limit = 0
    for n in sizes:
        if cpu_seconds(n) >= gpu_seconds(n):
            break
        limit = n
    return limit


def median_seconds(run: Callable[[np.ndarray, np.ndarray | None], object], make_inputs: Callable[[int], tuple],
                   n: int, runs: int = TIMING_RUNS) -> float:
    """The median wall time of `run` on a batch of n (after one untimed run)."""
    z, y = make_inputs(n)
    run(z, y)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(z, y)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gpu_memory_bytes(pid: int, nvidia_smi: str = "nvidia-smi") -> int | None:
    """GPU memory process `pid` holds, from nvidia-smi (the driver's own count: the CUDA context, cuDNN's
    workspaces and ONNX Runtime's arena); None without nvidia-smi or when it fails."""
    try:
        out = subprocess.run([nvidia_smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    mib = sum(float(used) for found, used in (line.split(",") for line in out.splitlines() if "," in line)
              if found.strip() == str(pid))
    return int(mib * 2**20)


GPU_MEMORY_EVERY_S = 15.0


async def watch(state, metrics, every_s: float = GPU_MEMORY_EVERY_S) -> None:
    """While the worker runs and any model runs on CUDA: the GPU memory this worker holds and that of the
    inference process its models use, read off the event loop; state.gpu_memory_bytes, for /models, is
    their sum."""
    loop = asyncio.get_running_loop()
    while True:
        models = list(state.models.models.values())
        own_cuda = any(model.local.provider != CPU for model in models)
        servers = {model.placement.process_pid for model in models if model.placement.provider != CPU} - {None}
        if own_cuda or servers:
            own = await loop.run_in_executor(None, gpu_memory_bytes, os.getpid()) if own_cuda else 0
            shared = [await loop.run_in_executor(None, gpu_memory_bytes, pid) for pid in servers]
            if own is not None:
                metrics.gpu_memory.set(own)
            if shared and None not in shared:
                metrics.gpu_process_memory.set(sum(m for m in shared if m is not None))
            state.gpu_memory_bytes = None if own is None else own + sum(m for m in shared if m is not None)
        await asyncio.sleep(every_s)
