"""CPU per request of the app alone: no HTTP server and (unless --real) no model, 64 concurrent callers of
/generate and of V2 binary infer sent straight into the ASGI app, and the CPU the process spends per
request (its batch and encode threads included). For a change's before and after, run it on both trees
(`serve_throughput.py --ref REF` leaves a worktree of REF in tests/benchmarks/results/worktree-REF):

    python tests/benchmarks/request_path.py [SRC_DIR] [--real] [--rounds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from v2_request import binary_infer


def v2_request() -> tuple[list, bytes]:
    """Headers and body of one binary V2 infer of cgan."""
    header, body = binary_infer(1)
    return [(b"inference-header-content-length", str(len(header)).encode()),
            (b"content-length", str(len(body)).encode())], body


async def call(app, method: str, path: str, query: bytes, headers: list, body: bytes) -> int:
    """One request through the ASGI app; its status."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": headers + [(b"host", b"bench")], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    status = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
    await app(scope, receive, send)
    return status[0]


async def measure(app, rounds: int) -> dict:
    headers, body = v2_request()
    loads = {"/generate": ("GET", "/generate", b"digit=3&n=1", [], b""),
             "V2 infer": ("POST", "/v2/models/cgan/infer", b"", headers, body)}
    out = {}
    async with app.router.lifespan_context(app):
        await asyncio.sleep(3)  # warm-up (this tree and older ones keep the model set under different names)
        for name, request in loads.items():
            async def caller(n: int, request=request):
                for _ in range(n):
                    assert await call(app, *request) == 200
            await asyncio.gather(*(caller(10) for _ in range(64)))  # warm
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(caller(rounds) for _ in range(64)))
            n = 64 * rounds
            out[name] = {"cpu_us_per_request": round((time.process_time() - cpu) / n * 1e6, 1),
                         "requests_per_s": round(n / (time.perf_counter() - wall))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[2]))
    parser.add_argument("--real", action="store_true", help="run the models (default: stubbed out)")
    parser.add_argument("--rounds", type=int, default=60, help="requests per caller")
    args = parser.parse_args()
    args.src = str(Path(args.src).resolve())
    sys.path.insert(0, args.src)
    os.chdir(args.src)
    from service.app import create_app
    from service.config import Settings
    # where a model's run lives: the registry in trees before the runtime (asked by file: an editable install
    # would import this tree's runtime into an older tree)
    if (Path(args.src) / "service" / "registry.py").is_file():
        from service.registry import LoadedModel as Model  # type: ignore[import-not-found]
    else:
        from service.runtime.model import ModelRuntime as Model  # type: ignore[no-redef]
    if not args.real:
        Model.run = lambda self, z, y: np.full((len(z), 1, 28, 28), 0.5, np.float32)  # type: ignore[method-assign]
    settings = {"quality_gate": False} if "quality_gate" in Settings.model_fields else {}  # a stub draws no digit
    app = create_app(Settings(models_dir=Path(args.src) / "exported", workers=1, intra_op_threads=1, **settings))
    import uvloop
    print(json.dumps(uvloop.run(measure(app, args.rounds))))


if __name__ == "__main__":
    main()
