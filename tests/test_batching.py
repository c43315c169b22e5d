"""Dynamic batching (service/runtime/batcher.py through a model's queue, service/runtime/model_queue.py):
requests share ONNX Runtime calls, each gets its own rows back unchanged, the queue is bounded, every job
is answered whatever raises, and /metrics shows the batches."""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import unversioned
from onnx_fixtures import write_models_dir

from service.app import create_app
from service.config import Settings
from service.metrics import Metrics
from service.runtime.batcher import InferenceFailed, QueueFull, RequestTimeout
from service.runtime.model import ModelRuntime
from service.runtime.model_queue import ModelQueue

BUNDLED = Path(__file__).resolve().parents[1] / "exported"


class FakeModel:
    """Records the batch size of every call; `gate` holds a call until the test opens it."""

    name = "fake"
    entry = SimpleNamespace(version="0123456789ab")

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.calls: list[int] = []
        self.gate, self.fail = gate, fail
        self.started = threading.Event()

    def run(self, z, y):
        self.calls.append(len(z))
        self.started.set()
        if self.gate:
            self.gate.wait(5)
        if self.fail:
            raise RuntimeError("model exploded")
        return np.repeat(z[:, :1, None, None], 28, axis=2).repeat(28, axis=3)  # [N, 1, 28, 28]: row i from z[i]

    def close(self):
        pass


def job_inputs(value: float, n: int = 1):
    return lambda: (np.full((n, 4), value, np.float32), None)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def make_batcher(model, executor, max_batch=64, max_wait_s=0.0, max_queued=64, threads=1, watch=None) -> ModelQueue:
    return ModelQueue(model, max_batch=max_batch, max_wait_s=max_wait_s, max_queued=max_queued, threads=threads,
                      encoder=executor, metrics=Metrics(), watch=watch)


def while_busy(batcher: ModelQueue, model: FakeModel, sizes: list[int], finish=len, values=None, extra=None):
    """Submit one job, and once the model is busy with it (held by its gate) the jobs of `sizes`; then
    open the gate and return every job's result (or exception), first job first. `extra()` runs while
    the jobs wait."""
    values = values or [0.5] * (1 + len(sizes))

    async def scenario():
        first = batcher.submit(1, job_inputs(values[0]), finish)
        await asyncio.to_thread(model.started.wait, 5)
        rest = [batcher.submit(n, job_inputs(v, n), finish) for n, v in zip(sizes, values[1:])]
        if extra:
            extra()
        model.gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)
    return asyncio.run(scenario())


def test_requests_queued_while_the_model_runs_share_the_next_call(executor):
    model = FakeModel(threading.Event())
    batcher = make_batcher(model, executor)
    results = while_busy(batcher, model, [1, 1, 1, 1], finish=lambda pixels: pixels,
                         values=[0.1, 0.2, 0.3, 0.4, 0.5])
    batcher.close()
    assert model.calls == [1, 4]
    # each request gets its own rows: value v becomes pixels round(255 v) (float32 0.3 is just below)
    assert [int(r[0, 0, 0]) for r in results] == [26, 51, 76, 102, 128]


def test_max_wait_gathers_requests_that_arrive_soon_after(executor):
    """A wait far longer than the test's pause (however loaded the machine); the batch goes as soon as it
    is full (max_batch 3), so the test never waits it out."""
    model = FakeModel()
    batcher = make_batcher(model, executor, max_batch=3, max_wait_s=30)

    async def scenario():
        first = batcher.submit(1, job_inputs(0.1), len)
        await asyncio.sleep(0.05)
        second = batcher.submit(2, job_inputs(0.2, 2), len)
        return await asyncio.gather(first, second)

    assert asyncio.run(scenario()) == [1, 2]
    batcher.close()
    assert model.calls == [3]


def test_batches_stop_at_max_batch_and_a_larger_request_runs_alone(executor):
    model = FakeModel(threading.Event())
    batcher = make_batcher(model, executor, max_batch=4)
    assert while_busy(batcher, model, [2, 2, 1, 6, 1]) == [1, 2, 2, 1, 6, 1]
    batcher.close()
    assert model.calls == [1, 4, 1, 6, 1]  # in arrival order: [2, 2] fills 4, then 1 (+6 would not fit), ...


def test_a_full_queue_refuses_new_jobs(executor):
    model = FakeModel(threading.Event())
    batcher = make_batcher(model, executor, max_queued=2)

    def one_more():
        with pytest.raises(QueueFull):
            batcher.submit(1, job_inputs(0.0), len)
    assert while_busy(batcher, model, [1, 1], extra=one_more) == [1, 1, 1]
    batcher.close()


def test_a_failed_inference_fails_every_job_of_its_batch_and_the_next_batch_runs(executor):
    model = FakeModel(threading.Event(), fail=True)
    batcher = make_batcher(model, executor)
    failed = while_busy(batcher, model, [1])
    assert all(isinstance(r, InferenceFailed) and "model exploded" in str(r) for r in failed), failed
    model.fail = False
    assert while_busy(batcher, model, []) == [1]  # the batcher survived
    batcher.close()


def test_an_encoding_failure_fails_its_job_only(executor):
    model = FakeModel(threading.Event())

    def finish(pixels):
        if pixels[0, 0, 0] == 51:
            raise ValueError("encoder exploded")
        return len(pixels)
    batcher = make_batcher(model, executor)
    results = while_busy(batcher, model, [1, 1], finish=finish, values=[0.1, 0.2, 0.3])
    batcher.close()
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], InferenceFailed) and "encoder exploded" in str(results[1])


def test_a_batch_whose_output_cannot_be_converted_fails_every_job():
    class Garbage(FakeModel):
        def run(self, z, y):
            return np.array(["not", "pixels"])  # to_uint8 raises on this
    with ThreadPoolExecutor(1) as executor:
        batcher = make_batcher(Garbage(), executor)

        async def scenario():
            return await asyncio.gather(batcher.submit(1, job_inputs(0.1), len),
                                        batcher.submit(1, job_inputs(0.2), len), return_exceptions=True)
        results = asyncio.run(asyncio.wait_for(scenario(), 10))  # never hangs
        batcher.close()
    assert all(isinstance(r, InferenceFailed) for r in results), results


def test_a_job_past_its_timeout_is_answered_and_never_run(executor):
    model = FakeModel(threading.Event())
    batcher = make_batcher(model, executor)

    async def scenario():
        first = batcher.submit(1, job_inputs(0.1), len)
        await asyncio.to_thread(model.started.wait, 5)  # the model holds the first job
        late = batcher.submit(1, job_inputs(0.2), len, timeout_s=0.01)
        with pytest.raises(RequestTimeout, match="no answer within 0.01 s"):
            await late
        model.gate.set()
        return await first
    assert asyncio.run(scenario()) == 1
    batcher.close()
    assert model.calls == [1]  # the expired job was dropped, not run


# --- through the HTTP API ------------------------------------------------------------------------

async def _serve(app, requests: list[tuple[str, dict]], then: str | None = None) -> list[httpx.Response]:
    """The requests at once, then (when given) one more GET once they are answered."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(*(client.get(path, params=params) for path, params in requests))
            return responses + ([await client.get(then)] if then else [])


@pytest.mark.skipif(not (BUNDLED / "manifest.json").is_file(), reason="no bundled models")
def test_a_response_does_not_depend_on_what_it_was_batched_with():
    """The bundled cgan (strided transposed convolutions): each request alone, then all of them at once
    with a wait long enough to batch them together; the bytes must be the same."""
    requests = [("/generate", {"digit": d, "seed": 100 + d, "n": 1 + d % 3}) for d in range(10)]
    requests += [("/sample", {"seed": 7, "n": 5, "format": "json"}), ("/interpolate", {"seed": 3, "steps": 4})]
    settings = Settings(models_dir=BUNDLED, workers=1, intra_op_threads=2)
    alone = [asyncio.run(_serve(create_app(settings, warm=False), [r]))[0] for r in requests]
    # one batch: it goes as soon as all 28 images are queued, and may wait a second for them
    app = create_app(settings.model_copy(update={"batch_max_size": 28, "batch_max_wait_ms": 1000}), warm=False)
    *together, metrics = asyncio.run(_serve(app, requests, then="/metrics"))
    calls = re.search(r'digitgen_inference_batch_size_count\{model="cgan"\} (\S+)', unversioned(metrics.text)).group(1)
    assert float(calls) <= 2, "the requests were not batched together"
    for a, b, request in zip(alone, together, requests):
        assert a.status_code == b.status_code == 200, request
        assert a.content == b.content, f"{request} differs when batched"


V2_GAN_INFER = {"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}


@pytest.mark.parametrize("method, path, body, endpoint, message", [
    ("GET", "/sample?model=gan", None, "/sample", "detail"),
    ("POST", "/v2/models/gan/infer", V2_GAN_INFER, "/v2/models/{name}/infer", "error"),  # the same queue
])
def test_the_api_answers_503_with_retry_after_when_a_queue_is_full(tmp_path, monkeypatch, method, path, body,
                                                                   endpoint, message):
    write_models_dir(tmp_path)
    entered, gate = threading.Event(), threading.Event()
    original = ModelRuntime.run

    def held(self, z, y):
        entered.set()
        gate.wait(10)
        return original(self, z, y)
    monkeypatch.setattr(ModelRuntime, "run", held)
    app = create_app(Settings(models_dir=tmp_path, workers=1, intra_op_threads=1, max_queued=2), warm=False)

    async def until(condition):
        for _ in range(400):  # however loaded the machine
            if await condition():
                return
            await asyncio.sleep(0.025)
        raise AssertionError("never happened")

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                def get(seed):
                    return asyncio.create_task(client.get("/sample", params={"model": "gan", "seed": seed}))

                async def queued_two():
                    return 'digitgen_queued_requests{model="gan"} 2.0' in unversioned((await client.get("/metrics")).text)

                async def running():
                    return entered.is_set()
                pending = [get(0)]
                await until(running)  # the first request is in the model, held there
                pending += [get(1), get(2)]
                await until(queued_two)  # two wait behind it: the queue is full
                refused = await client.request(method, path, json=body)
                gate.set()
                return refused, await asyncio.gather(*pending), (await client.get("/metrics")).text

    refused, served, metrics = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "queued" in refused.json()[message]
    assert [r.status_code for r in served] == [200, 200, 200]
    assert f'digitgen_requests_total{{endpoint="{endpoint}",status="503"}} 1.0' in metrics


def test_metrics_show_batch_sizes_queue_wait_and_inference_time(tmp_path):
    write_models_dir(tmp_path)
    app = create_app(Settings(models_dir=tmp_path, workers=1, intra_op_threads=1, batch_max_size=8,
                              batch_max_wait_ms=1000), warm=False)  # goes once all 8 images are queued
    responses = asyncio.run(_serve(app, [("/sample", {"model": "gan", "n": 2})] * 4, then="/metrics"))
    text = unversioned(responses[-1].text)
    assert 'digitgen_inference_batch_size_sum{model="gan"} 8.0' in text
    batches = float(re.search(r'digitgen_inference_batch_size_count\{model="gan"\} (\S+)', text).group(1))
    assert batches < 4  # the four requests shared calls
    assert 'digitgen_queue_wait_seconds_count{model="gan"} 4.0' in text
    assert re.search(r'digitgen_inference_seconds_count\{model="gan"\} \d', text)
    assert 'digitgen_queued_requests{model="gan"} 0.0' in text


def test_a_model_failure_is_a_500_with_the_reason_and_a_stuck_request_a_504(tmp_path, monkeypatch, caplog):
    write_models_dir(tmp_path)
    original, gate = ModelRuntime.run, threading.Event()

    def run(self, z, y):
        if self.name == "cgan":
            raise RuntimeError("CUDA error: an illegal memory access")
        gate.wait(10)  # gan: held until the test lets it go
        return original(self, z, y)
    monkeypatch.setattr(ModelRuntime, "run", run)
    app = create_app(Settings(models_dir=tmp_path, workers=1, intra_op_threads=1, request_timeout_s=0.2), warm=False)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                failed = await client.get("/generate", params={"digit": 1})
                v2_failed = await client.post("/v2/models/cgan/infer", json={"inputs": [
                    {"name": "z", "shape": [1, 6], "datatype": "FP32", "data": [0.0] * 6},
                    {"name": "y", "shape": [1, 10], "datatype": "FP32", "data": [1.0] + [0.0] * 9}]})
                stuck = await client.get("/sample", params={"model": "gan"})
                gate.set()
                return failed, v2_failed, stuck
    with caplog.at_level("ERROR"):
        failed, v2_failed, stuck = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert failed.status_code == 500 and "illegal memory access" in failed.json()["detail"]
    assert v2_failed.status_code == 500 and "illegal memory access" in v2_failed.json()["error"]
    assert "illegal memory access" in caplog.text  # logged where it happened
    assert stuck.status_code == 504 and "DIGITGEN_REQUEST_TIMEOUT_S" in stuck.json()["detail"]


def test_with_several_threads_a_model_has_several_batches_in_flight(executor):
    """For a model whose runs wait on another process (the GPU inference process): while one batch is held
    there, the next one runs."""
    model = FakeModel(threading.Event())
    batcher = make_batcher(model, executor, threads=2)

    async def scenario():
        held = batcher.submit(1, job_inputs(0.25), len)
        await asyncio.to_thread(model.started.wait, 5)
        model.started.clear()
        second = batcher.submit(2, job_inputs(0.75, 2), len)
        await asyncio.to_thread(model.started.wait, 5)  # the second thread took it while the first is held
        assert model.calls == [1, 2]
        model.gate.set()
        return await asyncio.gather(held, second)
    assert asyncio.run(scenario()) == [1, 2]
    batcher.close()
    assert not batcher.alive


def test_threads_waiting_for_a_batch_to_fill_never_find_it_taken_from_under_them(executor):
    """Several threads and a fill wait: one thread may take every job while another waits for more; the
    other goes back to waiting instead of dying on an empty queue."""
    model = FakeModel()
    batcher = make_batcher(model, executor, max_wait_s=0.02, threads=4)

    async def rounds():
        for _ in range(15):
            results = await asyncio.gather(*(batcher.submit(1, job_inputs(0.5), len) for _ in range(3)))
            assert results == [1, 1, 1]
    asyncio.run(rounds())
    assert batcher.alive
    batcher.close()


def test_a_watch_that_raises_fails_no_request_and_the_thread_goes_on(executor):
    """The watch (the live quality figure) runs on the batch thread outside the model call: its failure is
    logged, never a lost or failed request."""
    def watch(model, output):
        raise RuntimeError("watch exploded")
    batcher = make_batcher(FakeModel(), executor, watch=watch)

    async def scenario():
        return [await batcher.submit(1, job_inputs(0.5), len) for _ in range(3)]
    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [1, 1, 1]
    assert batcher.alive
    batcher.close()


def test_anything_raising_on_the_batch_thread_is_a_failed_request_never_a_lost_one(executor, monkeypatch):
    """Drawing the inputs, a metric or the hand-off may raise outside the model call: each job is still
    answered (InferenceFailed, a 500), at once rather than at its timeout, and the thread serves on."""
    from service.runtime import batcher as batching
    model = FakeModel()
    queue = make_batcher(model, executor)
    broken = {"observer": True}
    original = batching.Batcher._see

    def see(self, output):
        if broken["observer"]:
            raise KeyError("a metric exploded")
        return original(self, output)
    monkeypatch.setattr(batching.Batcher, "_see", see)

    async def scenario():
        failed = await asyncio.gather(queue.submit(1, job_inputs(0.5), len, timeout_s=20), return_exceptions=True)
        inputs_fail = await asyncio.gather(queue.submit(1, lambda: 1 / 0, len, timeout_s=20), return_exceptions=True)
        broken["observer"] = False
        return failed + inputs_fail, await queue.submit(1, job_inputs(0.5), len)
    failed, after = asyncio.run(asyncio.wait_for(scenario(), 10))  # never waits for the 20 s timeout
    assert all(isinstance(r, InferenceFailed) for r in failed), failed
    assert after == 1 and queue.alive
    queue.close()


def test_close_does_not_wait_forever_for_a_stuck_model(executor):
    """A model call that never returns (a hung device) cannot hold a reload or a shutdown: close gives up
    after its timeout and fails what is still queued."""
    model = FakeModel(threading.Event())
    queue = make_batcher(model, executor)

    async def scenario():
        stuck = queue.submit(1, job_inputs(0.5), len, timeout_s=30)
        await asyncio.to_thread(model.started.wait, 5)
        waiting = queue.submit(1, job_inputs(0.5), len, timeout_s=30)
        await asyncio.to_thread(queue.batcher.close, 0.2)
        outcome = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 5)
        model.gate.set()
        await stuck
        return outcome
    outcome = asyncio.run(scenario())
    assert isinstance(outcome[0], InferenceFailed) and "retired" in str(outcome[0])
