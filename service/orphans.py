"""Processes that must not outlive the supervisor: a worker or the inference process left behind by a
killed supervisor would keep serving on its port, or holding GPU memory, with nobody to stop it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal

log = logging.getLogger("digitgen.orphans")

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, signum: int = signal.SIGTERM) -> None:
    """`signum` for this process when its parent dies (Linux prctl PR_SET_PDEATHSIG; it fires when the
    parent's thread that started this process ends); and at once if `parent` is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the supervisor: a killed supervisor leaves this process running")
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signum)
