"""service/workers.py: a worker that was ready and dies is replaced at any age; one that fails before it
is ready stops the service; SIGHUP during start-up kills nobody; a dead worker's live metrics go."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
import urllib.request
from functools import partial

import pytest
from conftest import free_port, wait_until
from onnx_fixtures import write_models_dir

from service import workers
from service.app import create_app
from service.config import Settings
from service.lifecycle import Lifecycle
from service.plan import make_plan

pytestmark = pytest.mark.skipif(not workers.supported(), reason="a socket per worker is Linux only")


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def options(port: int) -> dict:
    return {"host": "127.0.0.1", "port": port, "log_level": "warning"}


def settings_of(models_dir, **settings) -> Settings:
    return Settings(models_dir=models_dir, intra_op_threads=1, log_level="warning", **settings)


def app_factory(models_dir, **settings):
    return partial(create_app, settings_of(models_dir, **settings))


def lifecycle_of(models_dir) -> Lifecycle:
    settings = settings_of(models_dir)
    return Lifecycle(settings, make_plan(settings, quiet=True))


def broken_app(supervised=None):
    raise RuntimeError("this app cannot start")


def slow_app(models_dir, started_file, supervised=None):
    """The app after a pause in which the worker marks that it is starting (SIGHUP arrives then)."""
    started_file.write_text(str(os.getpid()))
    time.sleep(1.5)
    return app_factory(models_dir)(supervised=supervised)


def wait_for(condition, seconds: float = 60) -> None:
    wait_until(condition, "the condition", seconds, every=0.1)


def answers(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def serve_while(scenario, factory, count: int, port: int, models_dir) -> int:
    """A supervisor in this (main) thread while `scenario(supervisor)` runs in another, then SIGTERM; the
    exit status."""
    supervisor = workers.Supervisor(factory, options(port), lifecycle_of(models_dir))

    def run():
        try:
            scenario(supervisor)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the supervisor stops its workers and returns
    threading.Thread(target=run, daemon=True).start()
    return supervisor.run(count)


def all_ready(supervisor: workers.Supervisor, count: int) -> bool:
    """Every worker serves (what the supervisor itself goes by)."""
    return len(supervisor.workers) == count and all(w.ready for w in supervisor.workers)


def pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_a_worker_that_dies_right_after_it_is_ready_is_replaced(tmp_path, restore_signals):
    """Killed within seconds of start, once ready: replaced (no start-up grace period), and the service
    keeps answering (connections the kernel had already queued on the dead worker's socket are lost)."""
    write_models_dir(tmp_path)
    port, seen = free_port(), {}

    def kill_one(supervisor):
        wait_for(lambda: all_ready(supervisor, 2), 60)
        seen["first"] = pids()
        os.kill(sorted(seen["first"])[0], signal.SIGKILL)
        wait_for(lambda: all(answers(port) for _ in range(20)), 30)  # the other worker serves on
        seen["answered_meanwhile"] = True
        wait_for(lambda: len(pids() - seen["first"]) == 1 and all_ready(supervisor, 2))
        seen["after"] = pids()
    assert serve_while(kill_one, app_factory(tmp_path), 2, port, tmp_path) == 0
    assert len(seen["after"] & seen["first"]) == 1 and seen["answered_meanwhile"]
    assert multiprocessing.active_children() == []


def test_a_worker_that_fails_before_it_is_ready_stops_the_service(tmp_path, restore_signals):
    write_models_dir(tmp_path)
    started = time.monotonic()
    assert workers.serve(broken_app, options(free_port()), 2, lifecycle_of(tmp_path)) == 1
    assert time.monotonic() - started < 30
    assert multiprocessing.active_children() == []


def test_a_taken_port_is_refused_before_any_worker_starts(tmp_path, restore_signals):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            workers.serve(broken_app, options(taken.getsockname()[1]), 2, lifecycle_of(tmp_path))
    assert multiprocessing.active_children() == []


def test_sighup_during_start_up_reloads_once_the_worker_is_up(tmp_path, restore_signals, monkeypatch):
    write_models_dir(tmp_path)
    shared = tmp_path / "prometheus"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))  # the supervisor counts reloads there
    port, seen, starting = free_port(), {}, tmp_path / "starting"

    def hup_while_starting(supervisor):
        wait_for(starting.exists, 60)  # the worker is inside its app factory, not yet serving
        os.kill(os.getpid(), signal.SIGHUP)  # the supervisor decides again; the worker joins with that set
        wait_for(lambda: all_ready(supervisor, 1), 60)
        seen["pid"] = pids()
        wait_for(lambda: 'digitgen_reloads_total{result="ok"} 1.0' in metrics(port), 30)
    assert serve_while(hup_while_starting, partial(slow_app, tmp_path, starting), 1, port, tmp_path) == 0
    assert seen["pid"] == {int(starting.read_text())}  # the worker that got the signal is the one serving


def test_a_dead_worker_leaves_no_live_gauges_behind(tmp_path, restore_signals, monkeypatch):
    write_models_dir(tmp_path)
    shared = tmp_path / "prometheus"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    port, seen = free_port(), {}

    def kill_one(supervisor):
        wait_for(lambda: all_ready(supervisor, 2), 60)
        wait_for(lambda: len(gauge_files(shared)) == 2, 30)  # each worker's queued-requests gauge
        victim = sorted(pids())[0]
        seen["victim_had_file"] = victim in gauge_files(shared)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in gauge_files(shared), 30)
        seen["victim"] = victim
    assert serve_while(kill_one, app_factory(tmp_path, workers=2), 2, port, tmp_path) == 0
    assert seen["victim_had_file"]


def gauge_files(folder) -> set[int]:
    """Workers with a live-sum gauge file in the shared metrics folder."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("gauge_livesum_*.db")}


def metrics(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""
