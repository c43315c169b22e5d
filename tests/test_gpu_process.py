"""The inference process that holds the GPU sessions for every worker (service/gpu_process.py), run here
with the CPU provider: what the workers get back, batching across workers, a crash and its restart, the
supervisor's plan and the GPU memory the service reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import providers
from service.app import create_app
from service.config import Settings
from service.gpu_process import GpuProcessError, Keeper, Runner, serving
from service.manifest import load_manifest
from service.providers import CPU, plan, shares_gpu
from service.registry import ModelFileError, open_model
from tests.onnx_fixtures import write_models_dir


@pytest.fixture
def models_dir(tmp_path):
    write_models_dir(tmp_path / "exported")
    return tmp_path / "exported"


@pytest.fixture
def process(tmp_path):
    """An inference process on the CPU provider, and the settings a worker gets to reach it."""
    settings = Settings(providers="cpu", intra_op_threads=1)
    keeper = Keeper(settings, tmp_path / "inference.sock")
    yield keeper, settings.model_copy(update={"gpu_process": tmp_path / "inference.sock"})
    keeper.stop()


def _inputs(model, n: int, seed: int = 0):
    z, y = model.zeros(n)
    z[:] = np.random.default_rng(seed).standard_normal(z.shape)
    return z, y


def test_a_worker_gets_the_images_its_own_session_makes(process, models_dir):
    _, settings = process
    for entry in load_manifest(models_dir).models:
        model = open_model(entry, models_dir, [CPU], settings)
        assert model.session.server_pid != os.getpid() and model.provider == CPU
        for n in (1, 7, 64, 300):  # 300: past the first buffer, which is then replaced by a larger one
            z, y = _inputs(model, n, seed=n)
            np.testing.assert_array_equal(model.session.run(["image"], {"z": z} | ({"y": y} if y is not None else {}))[0],
                                          model.cpu_session.run(["image"], {"z": z} | ({"y": y} if y is not None else {}))[0])


def test_a_file_the_process_cannot_open_leaves_the_model_out(process, models_dir):
    _, settings = process
    entry = load_manifest(models_dir).model("gan")
    (models_dir / entry.file).rename(models_dir / "moved.onnx")
    with pytest.raises(ModelFileError, match="is missing"):
        open_model(entry, models_dir, [CPU], settings)


def test_an_unreachable_process_leaves_the_model_out(tmp_path, models_dir):
    settings = Settings(providers="cpu", intra_op_threads=1, gpu_process=tmp_path / "nobody.sock")
    with pytest.raises(ModelFileError, match="unreachable"):
        open_model(load_manifest(models_dir).model("gan"), models_dir, [CPU], settings)


def test_while_the_process_is_down_batches_run_on_the_cpu_and_then_on_its_successor(process, models_dir):
    keeper, settings = process
    model = open_model(load_manifest(models_dir).model("cgan"), models_dir, [CPU], settings)
    z, y = _inputs(model, 5)
    before = model.run(z, y)
    killed = keeper.process
    dead = killed.pid
    os.kill(dead, signal.SIGKILL)
    killed.join(10)
    np.testing.assert_array_equal(model.run(z, y), before)  # the batch in flight is not sent again: the CPU runs it
    assert model.on_cpu_meanwhile
    deadline = time.monotonic() + 60
    while keeper.process.pid == dead or not keeper.process.is_alive():
        assert time.monotonic() < deadline, "no new inference process"
        time.sleep(0.05)
    while model.on_cpu_meanwhile:  # until the successor listens
        assert time.monotonic() < deadline, "never back on the inference process"
        np.testing.assert_array_equal(model.run(z, y), before)
        time.sleep(0.05)
    assert model.session.server_pid == keeper.process.pid


class Fake:
    """A session for an inference server run in this process: images whose pixels are z's first value."""

    def run(self, outputs, feeds):
        return [np.repeat(feeds["z"][:, :1, None, None], 28, axis=2).repeat(28, axis=3)]

    def get_providers(self):
        return ["FakeExecutionProvider"]


@pytest.fixture
def in_process(tmp_path):
    """An InferenceServer on a thread of this process, so a test can look inside it."""
    from multiprocessing.connection import Listener
    from service.gpu_process import InferenceServer
    server = InferenceServer(lambda path, sha256: Fake())
    listener = Listener(str(tmp_path / "s.sock"), family="AF_UNIX")
    threading.Thread(target=server.serve, args=(listener,), daemon=True).start()
    yield server, tmp_path / "s.sock"
    listener.close()


def test_closing_a_model_lets_the_process_drop_its_session(in_process):
    from service.gpu_process import RemoteSession
    server, address = in_process
    session = RemoteSession(address, address, "sha-a", 784, timeout_s=5)
    images = session.run(["image"], {"z": np.full((3, 4), 0.25, np.float32)})[0]
    assert images.shape == (3, 1, 28, 28) and (images == 0.25).all()
    assert server.users == {"sha-a": 1}
    session.close()
    deadline = time.monotonic() + 5
    while server.users:
        assert time.monotonic() < deadline, f"still held: {server.users}"
        time.sleep(0.01)
    assert server.runners == {}


def test_a_worker_gone_before_the_open_is_answered_leaves_no_session_held():
    from service.gpu_process import InferenceServer

    class Gone:
        def recv(self):
            return "open", "/x/gan.onnx", "sha-b"

        def send(self, message):
            raise BrokenPipeError("the worker died")

        def close(self):
            pass
    server = InferenceServer(lambda path, sha256: Fake())
    server.handle(Gone())
    assert server.users == {} and server.runners == {}


def test_a_process_that_does_not_answer_in_time_is_unreachable(tmp_path):
    from multiprocessing.connection import Listener
    from service.gpu_process import GpuProcessUnreachable, RemoteSession
    listener = Listener(str(tmp_path / "silent.sock"), family="AF_UNIX")
    held = []

    def silent():  # answers the open, then never a batch
        while True:
            conn = listener.accept()
            held.append(conn)
            conn.recv()
            conn.send(("ok", "FakeExecutionProvider", 1))
    threading.Thread(target=silent, daemon=True).start()
    session = RemoteSession(tmp_path / "silent.sock", tmp_path / "x.onnx", "sha", 784, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(GpuProcessUnreachable, match="did not answer within 0.3 s"):
        session.run(["image"], {"z": np.zeros((1, 4), np.float32)})
    assert time.monotonic() - started < 5
    assert session._links == []  # the link is dropped: a late answer must not be taken for the next batch's


def test_each_thread_has_its_own_connection_so_batches_can_be_in_flight_together(process, models_dir):
    _, settings = process
    model = open_model(load_manifest(models_dir).model("cgan"), models_dir, [CPU], settings)
    inputs = [_inputs(model, 3 + i, seed=i) for i in range(4)]
    got = {}

    def run(i):
        z, y = inputs[i]
        for _ in range(20):
            got[i] = model.session.run(["image"], {"z": z, "y": y})[0]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(model.session._links) == 4  # one per thread that ran it (the opening one is closed)
    for i, (z, y) in enumerate(inputs):
        np.testing.assert_array_equal(got[i], model.cpu_session.run(["image"], {"z": z, "y": y})[0])


class Gate:
    """A session whose first call waits for the test to open the gate; it records each call's batch size."""

    def __init__(self):
        self.calls, self.open = [], threading.Event()

    def run(self, outputs, feeds):
        self.calls.append(len(feeds["z"]))
        self.open.wait(10)
        if (feeds["z"] < 0).any():
            raise ValueError("negative z")
        return [np.repeat(feeds["z"][:, :1, None, None], 28, axis=2).repeat(28, axis=3)]

    def get_providers(self):
        return [CPU]


def test_batches_that_wait_together_run_as_one_call():
    session = Gate()
    runner = Runner(session)
    results = {}

    def send(value: float, n: int):
        results[value] = runner.run({"z": np.full((n, 4), value, np.float32)})
    first = threading.Thread(target=send, args=(1.0, 1))
    first.start()
    while not session.calls:
        time.sleep(0.001)
    others = [threading.Thread(target=send, args=(float(v), v)) for v in (2, 3)]
    for thread in others:
        thread.start()
    while len(runner._pending) < 2:  # both queued behind the busy call
        time.sleep(0.001)
    session.open.set()
    for thread in [first, *others]:
        thread.join(10)
    runner.close()
    assert session.calls == [1, 5]  # the two waiting batches shared one call
    for value, n in ((1.0, 1), (2.0, 2), (3.0, 3)):
        assert results[value].shape == (n, 1, 28, 28) and (results[value] == value).all()  # each its own rows


def test_a_failed_call_fails_every_batch_in_it_with_the_reason():
    session = Gate()
    session.open.set()
    runner = Runner(session)
    with pytest.raises(ValueError, match="negative z"):
        runner.run({"z": np.full((2, 4), -1, np.float32)})
    assert runner.run({"z": np.ones((1, 4), np.float32)}).shape == (1, 1, 28, 28)  # the runner goes on
    runner.close()


def test_the_plan_shares_the_gpu_only_on_cuda_with_several_workers(monkeypatch):
    assert not shares_gpu(plan(Settings(providers="cpu", workers=4)))
    monkeypatch.setattr(providers, "cuda_chosen", lambda setting: True)
    assert shares_gpu(plan(Settings(workers=4)))
    assert not shares_gpu(plan(Settings(workers=1)))  # one worker holds one set of sessions anyway
    assert not shares_gpu(plan(Settings(workers=4, gpu_sessions="per-worker")))
    assert plan(Settings(workers=4)).gpu_mem_limit_mb == 6144  # the one process has the whole budget
    assert plan(Settings(workers=4, gpu_sessions="per-worker")).gpu_mem_limit_mb == 1536  # shared out


def test_the_process_opens_cuda_sessions_with_the_arena_cap_and_a_worker_its_cpu_ones(monkeypatch, tmp_path):
    from service.providers import CUDA, session_providers
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(providers, "nvidia_driver_present", lambda: True)
    process = Settings(providers="auto", gpu_mem_limit_mb=6144)  # what the inference process gets
    chosen = session_providers(process)
    assert chosen[0][0] == CUDA and chosen[0][1]["gpu_mem_limit"] == str(6144 * 2**20) and chosen[1] == CPU
    assert session_providers(process.model_copy(update={"gpu_process": tmp_path / "s.sock"})) == [CPU]  # a worker's


def test_the_service_serves_through_the_process_and_reports_its_gpu_memory(monkeypatch, models_dir, tmp_path):
    monkeypatch.setattr(providers, "cuda_chosen", lambda setting: True)  # the process itself runs on the CPU
    settings = plan(Settings(models_dir=models_dir, providers="cpu", workers=2, intra_op_threads=1))
    with TestClient(create_app(settings.model_copy(update={"gpu_sessions": "per-worker"}))) as alone:
        expected = _ready(alone).get("/generate?digit=3&n=9&seed=5").content
    with serving(settings) as shared:
        assert shared.gpu_process.exists()
        server = _server_pid(shared)
        fake = tmp_path / "bin" / "nvidia-smi"  # this worker holds 100 MiB, the process 700
        fake.parent.mkdir()
        fake.write_text(f"#!/bin/sh\nprintf '{os.getpid()}, 100\\n{server}, 700\\n999999, 5000\\n'\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
        with TestClient(create_app(shared)) as client:
            body = _ready(client).get("/models").json()
            assert {m["name"]: m["gpu_process"] for m in body["models"]} == {"gan": True, "cgan": True}
            assert body["gpu_memory_bytes"] == 800 * 2**20
            assert client.get("/generate?digit=3&n=9&seed=5").content == expected
            metrics = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines()
                           if line.startswith("digitgen_gpu"))
            assert float(metrics["digitgen_gpu_process_memory_bytes"]) == 700 * 2**20
            assert float(metrics["digitgen_gpu_memory_bytes"]) == 100 * 2**20
    assert not shared.gpu_process.parent.exists()  # the socket's folder is gone with the process


def test_a_process_that_cannot_start_stops_the_service_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(providers, "cuda_chosen", lambda setting: True)
    settings = plan(Settings(providers="cpu", workers=2))
    too_long = tmp_path / ("d" * 120)  # a Unix socket's path is at most 107 bytes: the process cannot listen
    too_long.mkdir()
    monkeypatch.setattr("tempfile.mkdtemp", lambda prefix: str(too_long))
    with pytest.raises(GpuProcessError, match="did not start"):
        with serving(settings):
            pass


def _ready(client):
    for _ in range(500):
        if client.get("/readyz").status_code == 200:
            return client
        time.sleep(0.01)
    raise AssertionError("never ready")


def _server_pid(settings) -> int:
    from service.gpu_process import RemoteSession
    models_dir = settings.models_dir
    entry = load_manifest(models_dir).model("gan")
    return RemoteSession(settings.gpu_process, (models_dir / entry.file).resolve(), entry.sha256, 784, 5).server_pid


def test_a_sighup_while_the_process_starts_does_not_end_the_service(tmp_path):
    """SIGHUP's default action ends a process; the supervisor's handler comes only with the workers, after
    the inference process is up (seconds on CUDA). Run in a child: a regression would end the test run."""
    script = """
import os, signal, sys
from service import gpu_process, providers
from service.config import Settings
providers.cuda_chosen = lambda setting: True
original = gpu_process.Keeper.start
def start(self):
    os.kill(os.getpid(), signal.SIGHUP)  # a reload asked for while the process starts
    return original(self)
gpu_process.Keeper.start = start
with gpu_process.serving(providers.plan(Settings(providers="cpu", workers=2))) as settings:
    assert settings.gpu_process.exists()
print("served")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "served" in done.stdout, done.stderr[-2000:]
