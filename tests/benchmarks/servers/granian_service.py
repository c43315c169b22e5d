"""The service's app (create_app, standalone: each worker decides and loads the models itself) served by
granian (Rust, hyper underneath) instead of uvicorn, for the server comparison of issue 29:

    python tests/benchmarks/servers/granian_service.py --port P --workers N

No gRPC (each worker would bind DIGITGEN_GRPC_PORT) and none of the service's own HTTP edge
(service/http_protocol.py is uvicorn's protocol class): granian's own limits apply.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]  # this module and the project, for granian's workers too
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")])


def app():
    from service.app import create_app
    from service.config import Settings
    return create_app(Settings())


if __name__ == "__main__":
    from granian import Granian
    from granian.constants import Interfaces, Loops
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    Granian("granian_service:app", address="127.0.0.1", port=args.port, interface=Interfaces.ASGI,
            workers=args.workers, factory=True, loop=Loops.uvloop, log_enabled=False).serve()
