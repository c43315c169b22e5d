"""Serve a benchmark app with the service's own worker setup (a socket per worker), so the baseline,
the ceiling and the service differ only in the app:

    python tests/benchmarks/servers/launch.py baseline|ceiling --port P --workers N
"""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]  # the apps here, and the project for `service`; workers inherit it

from service import workers  # noqa: E402
from service.config import Settings  # noqa: E402
from service.lifecycle import Lifecycle  # noqa: E402
from service.plan import make_plan  # noqa: E402


def make_app(name: str, supervised=None):
    """The benchmark app; it has no models to prepare, so it answers the supervisor's lifecycle at once
    (service/coordinator.py: prepared, then serving once told to commit)."""
    app = importlib.import_module(name).create_app()
    if supervised is not None:
        threading.Thread(target=_follow, args=(supervised,), daemon=True).start()
    return app


def _follow(supervised) -> None:
    channel = supervised.channel
    channel.send(("prepared", supervised.decision.generation, None))
    while True:
        try:
            kind, *args = channel.recv()
        except (EOFError, OSError):
            return
        if kind == "commit":
            channel.send(("serving", args[0]))
        elif kind == "prepare":
            channel.send(("prepared", args[0].generation, None))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app", choices=("baseline", "ceiling"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    settings = Settings()  # the supervisor decides over the bundled models; these apps serve none of them
    sys.exit(workers.run(partial(make_app, args.app), {"host": "127.0.0.1", "port": args.port, "log_level": "warning",
                                                       "access_log": False}, args.workers,
                         Lifecycle(settings, make_plan(settings, quiet=True))))
