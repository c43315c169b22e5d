"""Each worker's own process figures in /metrics: CPU time, resident memory, open files, threads.

prometheus_client's ProcessCollector does not work with several workers (its values are not written to the
shared files), so each worker reads its own from /proc and sets gauges kept per process: with several
workers every series carries the worker's `pid` label. Read when /metrics is scraped (the answering worker)
and every PROCESS_EVERY_S by each worker, so an idle worker's figures are at most that old.
"""

from __future__ import annotations

import asyncio
import os
import resource

PROCESS_EVERY_S = 5.0
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read() -> dict[str, float]:
    """This process's figures; on a system without /proc, what getrusage gives (CPU time, peak memory)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {"cpu_seconds": usage.ru_utime + usage.ru_stime, "resident_memory_bytes": usage.ru_maxrss * 1024.0}
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        figures["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
        figures["threads"] = float(fields[17])
        with open("/proc/self/statm") as statm:
            figures["resident_memory_bytes"] = float(int(statm.read().split()[1]) * PAGE_BYTES)
        figures["open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except (OSError, IndexError, ValueError):
        pass
    return figures


def update(metrics) -> None:
    for name, value in read().items():
        metrics.process[name].set(value)


async def watch(metrics, every_s: float = PROCESS_EVERY_S) -> None:
    while True:
        update(metrics)
        await asyncio.sleep(every_s)
