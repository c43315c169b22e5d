"""service/workers.py: a worker that dies is replaced, one that fails at startup stops the service."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest

from onnx_fixtures import write_models_dir
from service import workers

pytestmark = pytest.mark.skipif(not workers.supported(), reason="a socket per worker is Linux only")


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port: int, app: str = "service.app:create_app") -> dict:
    return {"app": app, "factory": True, "host": "127.0.0.1", "port": port, "log_level": "warning"}


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def answers(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def test_a_worker_that_dies_is_replaced_and_the_service_keeps_answering(tmp_path, monkeypatch, restore_signals):
    write_models_dir(tmp_path)
    monkeypatch.setenv("DIGITGEN_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("DIGITGEN_WORKERS", "2")
    monkeypatch.setenv("DIGITGEN_LOG_LEVEL", "warning")
    port = free_port()
    seen = {}

    def kill_one_then_stop():
        try:
            wait_for(lambda: len(multiprocessing.active_children()) == 2 and answers(port))
            victim = multiprocessing.active_children()[0]
            seen["first"] = {p.pid for p in multiprocessing.active_children()}
            os.kill(victim.pid, signal.SIGKILL)
            wait_for(lambda: len({p.pid for p in multiprocessing.active_children()} - seen["first"]) == 1)
            wait_for(lambda: answers(port))
            seen["after"] = {p.pid for p in multiprocessing.active_children()}
            seen["answers"] = all(answers(port) for _ in range(10))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve() stops its workers and returns

    threading.Thread(target=kill_one_then_stop, daemon=True).start()
    assert workers.serve(config(port), 2, startup_grace_s=0) == 0
    assert len(seen["after"]) == 2 and len(seen["after"] & seen["first"]) == 1 and seen["answers"]
    assert multiprocessing.active_children() == []


def test_a_worker_that_fails_at_startup_stops_the_service(restore_signals):
    started = time.monotonic()
    assert workers.serve(config(free_port(), app="no_such_module:create_app"), 2) == 1
    assert time.monotonic() - started < 30
    assert multiprocessing.active_children() == []


def test_a_taken_port_is_refused_before_any_worker_starts(restore_signals):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            workers.serve(config(taken.getsockname()[1]), 2)
    assert multiprocessing.active_children() == []
