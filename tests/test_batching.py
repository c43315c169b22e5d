"""Dynamic batching: requests share ONNX Runtime calls, each gets its own rows back unchanged, the queue
is bounded, and /metrics shows the batches."""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from onnx_fixtures import write_models_dir
from service.app import create_app
from service.batching import Batcher, QueueFull
from service.config import Settings
from service.metrics import Metrics
from service.registry import LoadedModel

BUNDLED = Path(__file__).resolve().parents[1] / "exported"


class FakeModel:
    """Records the batch size of every call; `gate` holds a call until the test opens it."""

    name = "fake"

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


def job_inputs(value: float, n: int = 1):
    return lambda: (np.full((n, 4), value, np.float32), None)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def make_batcher(model, executor, max_batch=64, max_wait_s=0.0, max_queued=64) -> Batcher:
    return Batcher(model, max_batch, max_wait_s, max_queued, executor, Metrics())


def while_busy(batcher: Batcher, model: FakeModel, sizes: list[int], finish=len, values=None, extra=None):
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
    model = FakeModel()
    batcher = make_batcher(model, executor, max_wait_s=0.5)

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
    assert all(isinstance(r, RuntimeError) for r in while_busy(batcher, model, [1]))
    model.fail = False
    assert while_busy(batcher, model, []) == [1]  # the batcher survived
    batcher.close()


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
    settings = Settings(models_dir=BUNDLED, workers=1, intra_op_threads=2, batch_max_wait_ms=200)
    requests = [("/generate", {"digit": d, "seed": 100 + d, "n": 1 + d % 3}) for d in range(10)]
    requests += [("/sample", {"seed": 7, "n": 5, "format": "json"}), ("/interpolate", {"seed": 3, "steps": 4})]
    alone = [asyncio.run(_serve(create_app(settings, warm=False), [r]))[0] for r in requests]
    app = create_app(settings, warm=False)
    *together, metrics = asyncio.run(_serve(app, requests, then="/metrics"))
    calls = re.search(r'digitgen_inference_batch_size_count\{model="cgan"\} (\S+)', metrics.text).group(1)
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
    original = LoadedModel.run

    def held(self, z, y):
        entered.set()
        gate.wait(10)
        return original(self, z, y)
    monkeypatch.setattr(LoadedModel, "run", held)
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
                    return 'digitgen_queued_requests{model="gan"} 2.0' in (await client.get("/metrics")).text

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
    app = create_app(Settings(models_dir=tmp_path, workers=1, intra_op_threads=1, batch_max_wait_ms=200), warm=False)
    responses = asyncio.run(_serve(app, [("/sample", {"model": "gan", "n": 2})] * 4, then="/metrics"))
    text = responses[-1].text
    assert 'digitgen_inference_batch_size_sum{model="gan"} 8.0' in text
    batches = float(re.search(r'digitgen_inference_batch_size_count\{model="gan"\} (\S+)', text).group(1))
    assert batches < 4  # the four requests shared calls
    assert 'digitgen_queue_wait_seconds_count{model="gan"} 4.0' in text
    assert re.search(r'digitgen_inference_seconds_count\{model="gan"\} \d', text)
    assert 'digitgen_queued_requests{model="gan"} 0.0' in text
