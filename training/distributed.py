"""Training on several processes: torchrun's environment, DistributedDataParallel, one writer.

`torchrun --nproc_per_node N -m training train MODEL ...` starts N copies of the program and sets RANK,
LOCAL_RANK and WORLD_SIZE in each. Every rank holds the whole (small) dataset and trains on its shard of
each epoch's permutation; gradients are averaged across ranks by DistributedDataParallel (NCCL on CUDA,
one GPU per process; gloo on the CPU). Rank 0 alone writes the run folder. Without torchrun's
environment (or with one process) a run is a plain single-process run and nothing here acts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A distributed run that cannot start; the message names the setting."""


@dataclass(frozen=True)
class World:
    """Where this process stands among the run's processes."""
    rank: int = 0        # global: picks the data shard and the noise stream; rank 0 writes
    local_rank: int = 0  # on this machine: picks the GPU
    size: int = 1        # processes in the run (the global batch is size x --batch-size)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_environment(environ: dict[str, str] | None = None) -> World:
    """The world torchrun describes in RANK, LOCAL_RANK and WORLD_SIZE; one process without them."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        world = World(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    except ValueError:
        raise DistributedError(f"RANK, LOCAL_RANK, WORLD_SIZE must be integers, got {env.get('RANK')!r}, "
                               f"{env.get('LOCAL_RANK')!r}, {env.get('WORLD_SIZE')!r}") from None
    if not 0 <= world.rank < world.size:
        raise DistributedError(f"RANK {world.rank} outside WORLD_SIZE {world.size}")
    return world


def join(world: World, device: torch.device) -> torch.device:
    """Join the process group (once per process) and return this rank's device: cuda:LOCAL_RANK with
    NCCL, or the CPU with gloo."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {world.local_rank}: this machine has only "
                                   f"{torch.cuda.device_count()} CUDA devices (--nproc_per_node too large)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.size, timeout=timedelta(minutes=10))
    return device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_first(world: World, load: Callable[[], T]) -> T:
    """`load()` on each machine's local rank 0 first (it may download), then on the other ranks."""
    if world.distributed and world.local_rank != 0:
        dist.barrier()
    result = load()
    if world.distributed and world.local_rank == 0:
        dist.barrier()
    return result


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(world: World, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each figure across the ranks (every rank passes the same keys; NCCL wants `device`)."""
    if not world.distributed or not values:
        return values
    keys = list(values)  # the same order on every rank: the step returns its terms in a fixed order
    totals = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return dict(zip(keys, (totals / world.size).tolist()))


def noise_seed(seed: int, world: World) -> int:
    """Each rank's seed for the noise it draws (z, eps, GP mixing): rank 0 keeps the run's seed, so a
    one-process run is unchanged; the others draw their own, so the ranks' fakes are not copies."""
    return seed + 1_000_033 * world.rank
