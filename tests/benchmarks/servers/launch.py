"""Serve a benchmark app with the service's own worker setup (a socket per worker), so the baseline,
the ceiling and the service differ only in the app:

    python tests/benchmarks/servers/launch.py baseline|ceiling --port P --workers N
"""

from __future__ import annotations

import argparse
import importlib
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]  # the apps here, and the project for `service`; workers inherit it

from service import workers  # noqa: E402


def make_app(name: str, on_ready=None):
    """The benchmark app; it has no models to warm, so it is ready once built."""
    app = importlib.import_module(name).create_app()
    if on_ready is not None:
        on_ready()
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app", choices=("baseline", "ceiling"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sys.exit(workers.run(partial(make_app, args.app), {"host": "127.0.0.1", "port": args.port, "log_level": "warning",
                                                       "access_log": False}, args.workers))
