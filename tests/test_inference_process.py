"""The inference process (service/inference/) run for real on the CPU provider (DIGITGEN_INFERENCE_PROCESS=on):
what a worker gets back, batches merged across workers, and its faults, each done to the real thing:
stopped under load, killed while a worker starts and while the service reloads, unable to reopen a file,
silent, crash-looping; and the supervisor killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import running_service, wait_until
from onnx_fixtures import new_version, write_models_dir

from service.config import Settings
from service.inference import wire
from service.inference.client import open_remote
from service.inference.keeper import Keeper
from service.inference.server import InferenceServer
from service.manifest import load_manifest
from service.plan import make_plan
from service.providers import CPU
from service.runtime.model import QUARANTINE_AFTER, ModelRuntime, RemoteLost, State
from service.runtime.session import LocalSession, open_model_session, zeros

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="memfd, SO_REUSEPORT and prctl are Linux's")

# The process's provider: the CPU here and in CI; on a GPU machine tests/benchmarks/gpu_check.sh sets cuda
PROVIDERS = os.environ.get("DIGITGEN_TEST_PROVIDERS", "cpu")
TOLERANCE = 0.0 if PROVIDERS == "cpu" else 1e-2  # CUDA's kernels round differently from the CPU's


@pytest.fixture
def models_dir(tmp_path):
    write_models_dir(tmp_path / "exported")
    return tmp_path / "exported"


def on_cpu(models_dir: Path, **extra) -> Settings:
    return Settings(models_dir=models_dir, providers=PROVIDERS, intra_op_threads=1, inference_process="on", **extra)


@pytest.fixture
def keeper(tmp_path, models_dir):
    settings = on_cpu(models_dir, inference_deadline_s=1.0)
    keeper = Keeper(settings, make_plan(settings), tmp_path / "inference.sock")
    yield keeper
    keeper.stop()


def inputs(entry, n: int, seed: int = 0):
    z, y = zeros(entry, n)
    z[:] = np.random.default_rng(seed).standard_normal(z.shape)
    return z, y


def threads_of(pid: int) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Threads:")))


def rss_of(pid: int) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:"))) * 1024


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the process and a worker's link to it ------------------------------------------------------------

def test_a_worker_gets_the_images_its_own_session_makes(keeper, models_dir):
    for entry in load_manifest(models_dir).models:
        local = open_model_session(models_dir / entry.file, entry, [CPU], 1)
        remote = open_remote(keeper.address, entry, models_dir / entry.file, [1, 64])
        assert remote.pid == keeper.process.pid != os.getpid()
        assert remote.provider == (CPU if PROVIDERS == "cpu" else "CUDAExecutionProvider")
        for n in (1, 7, 64, 300):  # 300: past the first buffer, which is then replaced by a larger one
            z, y = inputs(entry, n, seed=n)
            np.testing.assert_allclose(remote.run_within(z, y, 10), local.run(z, y), rtol=0, atol=TOLERANCE)
        remote.close()


def test_a_file_the_process_cannot_open_is_refused_with_the_reason(keeper, models_dir):
    entry = load_manifest(models_dir).model("gan")
    (models_dir / entry.file).write_bytes(b"replaced on disk")
    with pytest.raises(RemoteLost, match="cannot open it: .*has sha256"):
        open_remote(keeper.address, entry, models_dir / entry.file, [1])


def test_a_silent_process_is_lost_within_the_deadline_and_the_link_dropped(tmp_path, models_dir):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen()
    held = []

    def silent():  # answers the open, then never a batch
        while True:
            conn, _ = listener.accept()
            held.append(conn)
            wire.receive(conn)
            wire.send(conn, wire.OK, {"provider": CPU, "pid": 1})
    threading.Thread(target=silent, daemon=True).start()
    entry = load_manifest(models_dir).model("gan")
    remote = open_remote(tmp_path / "silent.sock", entry, models_dir / entry.file, [1])
    started = time.monotonic()
    with pytest.raises(RemoteLost, match="did not answer within 0.3 s") as lost:
        remote.run_within(*zeros(entry, 1), deadline_s=0.3)
    assert time.monotonic() - started < 3 and not lost.value.died
    assert remote._idle == []  # a late answer must never be taken for the next batch's


class Gate(LocalSession):
    """A session whose calls wait for the test once it closes the gate; it records each call's size."""

    def __init__(self):
        self.provider, self.calls, self.open = CPU, [], threading.Event()
        self.open.set()  # warm-up passes

    def run(self, z, y):
        self.calls.append(len(z))
        self.open.wait(10)
        return np.repeat(z[:, :1, None, None], 28, axis=2).repeat(28, axis=3)


def test_batches_that_wait_together_run_as_one_call_up_to_the_largest_warmed_size(tmp_path, models_dir):
    session = Gate()
    server = InferenceServer(lambda path, sha, latent, classes: session, max_batch=8)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "s.sock"))
    listener.listen()
    threading.Thread(target=server.serve, args=(listener,), daemon=True).start()
    entry = load_manifest(models_dir).model("gan")
    remotes = [open_remote(tmp_path / "s.sock", entry, models_dir / entry.file, [1, 2]) for _ in range(4)]
    assert session.calls == [1, 2, 8]  # warmed once, at every size asked for and the largest it merges
    session.calls.clear()
    session.open.clear()
    results = {}

    def send(i, value, n):
        results[i] = remotes[i].run_within(np.full((n, 8), value, np.float32), None, 10)
    with ThreadPoolExecutor(4) as pool:
        pool.submit(send, 0, 1.0, 1)
        wait_until(lambda: session.calls, "the first batch never ran")
        waiting = [pool.submit(send, i, float(i + 1), 4) for i in (1, 2, 3)]
        wait_until(lambda: len(server.sessions[next(iter(server.sessions))].batcher._jobs) == 3,
                   "the three batches never queued")
        session.open.set()
        for done in waiting:
            done.result(10)
    assert session.calls == [1, 8, 4]  # two of the waiting batches share a call: 8 rows is the bound
    for i, n in ((0, 1), (1, 4), (2, 4), (3, 4)):
        assert results[i].shape == (n, 1, 28, 28) and (results[i] == i + 1).all()  # each its own rows


def test_the_process_holds_a_bounded_set_of_threads_whatever_the_connections(keeper, models_dir):
    entry = load_manifest(models_dir).model("cgan")
    first = open_remote(keeper.address, entry, models_dir / entry.file, [1])
    before = threads_of(keeper.process.pid)
    remotes = [open_remote(keeper.address, entry, models_dir / entry.file, [1]) for _ in range(40)]
    for remote in remotes:
        remote.run_within(*inputs(entry, 2), deadline_s=10)
    assert threads_of(keeper.process.pid) <= before + 1  # not a thread per connection
    for remote in [first, *remotes]:
        remote.close()


class Dying:
    """A remote whose every batch breaks as the process dies during it."""
    provider, pid = CPU, 4242

    def run(self, z, y):
        raise RemoteLost("the inference process went away", died=True)

    def run_within(self, z, y, deadline_s):
        return self.run(z, y)

    def gone(self):
        return False

    def close(self):
        pass


def test_a_model_whose_batches_keep_killing_the_process_is_quarantined_on_the_cpu(models_dir):
    entry = load_manifest(models_dir).model("gan")
    local = open_model_session(models_dir / entry.file, entry, [CPU], 1)
    model = ModelRuntime(entry, models_dir / entry.file, local, None, True, 0.5, 5)
    z, y = inputs(entry, 3)
    for _ in range(QUARANTINE_AFTER):
        assert model.needs_attach
        model._remote = Dying()  # attached (timing skipped), then its next batch dies
        np.testing.assert_array_equal(model.run(z, y), local.run(z, y))  # the batch still runs, on the CPU
    assert model.placement.state is State.QUARANTINED and "died 3 times" in model.placement.detail
    assert not model.needs_attach


def crashing(settings, plan, address, ready, parent):
    """An inference process that dies as soon as it has started."""
    ready.set()
    os._exit(3)


def test_a_crash_loop_backs_off(tmp_path, models_dir):
    settings = on_cpu(models_dir)
    keeper = Keeper(settings, make_plan(settings), tmp_path / "inference.sock", target=crashing)
    try:
        wait_until(lambda: len(keeper.restarts) >= 3, "the keeper stopped restarting", 60)
        assert keeper.restarts[:3] == [0.5, 1.0, 2.0]  # growing delays, not a restart a millisecond
    finally:
        keeper.stop()


def test_a_hung_process_is_killed_and_replaced(keeper):
    hung = keeper.process.pid
    os.kill(hung, signal.SIGSTOP)
    wait_until(lambda: keeper.process.pid != hung and keeper.process.is_alive(), "no new process", 30)
    assert not alive(hung)


# --- the whole service ----------------------------------------------------------------------------

def model_states(url: str) -> dict[str, dict]:
    body = json.load(urllib.request.urlopen(f"{url}/models", timeout=5))
    return {m["name"]: m["runtime"] for m in body["models"]}


def attached_to(url: str, workers: int) -> int | None:
    """The inference process every model of every worker answering runs in, or None (several looks, since
    the kernel spreads new connections over the workers)."""
    pids = set()
    for _ in range(4 * workers):
        states = model_states(url)
        if any(s["state"] != "inference process" for s in states.values()):
            return None
        pids |= {s["inference_process_pid"] for s in states.values()}
    return pids.pop() if len(pids) == 1 else None


SERVICE = {"providers": PROVIDERS, "inference_process": "on", "inference_deadline_s": "2", "gpu_deadline_min_ms": "300"}


@pytest.mark.slow
def test_a_stopped_process_under_load_costs_no_request_and_is_replaced(models_dir):
    with running_service(models_dir, workers=2, **SERVICE) as service:
        stopped = wait_until(lambda: attached_to(service.url, 2), "never attached")
        workers = children_of(service.process.pid) - {stopped}
        threads, memory = {w: threads_of(w) for w in workers}, {w: rss_of(w) for w in workers}
        outcomes, stop = [], threading.Event()

        def load(seed):
            while not stop.is_set():
                started = time.monotonic()
                url = f"{service.url}/generate?digit=3&n=64&seed={seed}"
                with urllib.request.urlopen(url, timeout=30) as response:
                    outcomes.append((response.status, time.monotonic() - started))
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(load, seed) for seed in range(4)]
            try:
                time.sleep(1)
                os.kill(stopped, signal.SIGSTOP)
                replaced = wait_until(lambda: (pid := attached_to(service.url, 2)) and pid != stopped and pid,
                                      "the stopped process was never replaced", 60)
                time.sleep(1)
            finally:
                stop.set()
            for done in running:
                done.result(60)  # a failed request raises here
        assert not alive(stopped) and alive(replaced)
        assert len(outcomes) > 20 and all(status == 200 for status, _ in outcomes)
        assert max(seconds for _, seconds in outcomes) < 5  # the GPU deadline, then the CPU: never the 30 s timeout
        for worker in workers:
            assert threads_of(worker) <= threads[worker] + 2, "threads grew"
            assert rss_of(worker) < memory[worker] + 64 * 2**20, "memory grew"


def every_worker_serves(url: str, names: set[str], workers: int = 2) -> bool:
    for _ in range(6 * workers):
        if urllib.request.urlopen(f"{url}/readyz", timeout=5).status != 200 or set(model_states(url)) != names:
            return False
    return True


@pytest.mark.slow
def test_a_process_killed_while_a_worker_starts_leaves_no_model_out(models_dir):
    with running_service(models_dir, workers=2, **SERVICE) as service:
        process = wait_until(lambda: attached_to(service.url, 2), "never attached")
        before = children_of(service.process.pid)
        worker = next(iter(before - {process}))
        os.kill(process, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)  # its replacement starts while the process restarts
        wait_until(lambda: len(children_of(service.process.pid) - before) >= 2,  # a new process, a new worker
                   "no replacement worker", 60)
        wait_until(lambda: every_worker_serves(service.url, {"gan", "cgan"}), "a worker left a model out", 60)
        wait_until(lambda: (pid := attached_to(service.url, 2)) and pid != process, "never attached again", 60)


@pytest.mark.slow
def test_a_process_killed_during_a_reload_leaves_no_model_out(models_dir):
    with running_service(models_dir, workers=2, **SERVICE) as service:
        process = wait_until(lambda: attached_to(service.url, 2), "never attached")
        new_version(models_dir)
        os.kill(service.process.pid, signal.SIGHUP)
        os.kill(process, signal.SIGKILL)
        wait_until(lambda: every_worker_serves(service.url, {"gan", "cgan", "gan-b"}), "the reload left a model out", 60)
        with urllib.request.urlopen(f"{service.url}/sample?model=gan-b&n=64", timeout=30) as response:
            assert response.status == 200
        wait_until(lambda: (pid := attached_to(service.url, 2)) and pid != process, "never attached again", 60)


@pytest.mark.slow
def test_a_killed_supervisor_leaves_no_worker_on_the_port(models_dir):
    with running_service(models_dir, workers=2, **SERVICE) as service:
        port = int(service.url.rsplit(":", 1)[1])
        children = children_of(service.process.pid)
        assert len(children) >= 3  # two workers, the inference process (and multiprocessing's resource tracker)
        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait(10)
        wait_until(lambda: not any(alive(child) for child in children), "a worker outlived its supervisor", 30)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
