"""Hot reload: SIGHUP re-reads the manifest and swaps the model set in one step, without dropping requests."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import running_service, wait_ready
from fastapi.testclient import TestClient
from onnx_fixtures import new_version, write_models_dir

from service.app import create_app
from service.config import Settings
from service.manifest import Manifest


@pytest.fixture
def app_and_client(tmp_path):
    write_models_dir(tmp_path / "exported")
    app = create_app(Settings(models_dir=tmp_path / "exported", intra_op_threads=1))
    with TestClient(app) as client:
        yield app, wait_ready(client), tmp_path / "exported"


def reload(app, client) -> bool:
    return client.portal.call(app.state.reloader.reload)


def test_a_reload_swaps_in_new_and_changed_models_and_keeps_the_unchanged_ones(app_and_client):
    app, client, folder = app_and_client
    seeded = {"model": "gan", "seed": 3}
    before = client.get("/sample", params=seeded)
    old = app.state.models
    cgan_batcher, cgan_session = old.queues[old.models["cgan"].key], old.models["cgan"].local
    gan_batcher = old.queues[old.models["gan"].key]
    new_version(folder)
    assert reload(app, client)
    after = client.get("/sample", params=seeded)
    assert after.status_code == 200 and after.content != before.content  # the new gan draws
    assert after.headers["etag"] != before.headers["etag"]  # a changed file changes its ETags
    assert {m["name"] for m in client.get("/models").json()["models"]} == {"gan", "cgan", "gan-b"}
    new = app.state.models
    assert new is not old and old.models.keys() == {"gan", "cgan"}  # a new set, the old one untouched
    assert new.queues[new.models["cgan"].key] is cgan_batcher and new.models["cgan"].local is cgan_session
    assert new.queues[new.models["gan"].key] is not gan_batcher and not gan_batcher.alive
    assert client.get("/readyz").json()["left_out"] == {}
    assert 'digitgen_reloads_total{result="ok"} 1.0' in client.get("/metrics").text


def test_a_failed_reload_leaves_the_old_set_serving_and_says_why(app_and_client):
    app, client, folder = app_and_client
    before = client.get("/sample", params={"model": "gan", "seed": 3}).content
    new_version(folder, broken=True)
    assert not reload(app, client)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert "gan-v3.onnx is missing" in ready.json()["left_out"]["gan"]
    assert client.get("/sample", params={"model": "gan", "seed": 3}).content == before
    assert client.get("/models/gan-b").status_code == 404
    assert 'digitgen_reloads_total{result="failed"} 1.0' in client.get("/metrics").text
    (folder / "manifest.json").write_text("{not json")
    assert not reload(app, client)
    assert "not valid JSON" in client.get("/readyz").json()["left_out"]["manifest"]


def test_a_model_removed_from_the_manifest_goes_away(app_and_client):
    app, client, folder = app_and_client
    manifest = Manifest.model_validate_json((folder / "manifest.json").read_text())
    only_cgan = Manifest(models=[manifest.model("cgan")], defaults={"sample": "cgan", "generate": "cgan",
                                                                     "interpolate": "cgan"})
    (folder / "manifest.json").write_text(only_cgan.to_json())
    assert reload(app, client)
    assert client.get("/sample", params={"model": "gan"}).status_code == 404
    assert client.get("/sample").headers["x-model"] == "cgan"
    assert "gan" not in app.state.models.queues


def test_sighup_under_load_drops_nothing(tmp_path):
    """Two workers, eight clients requesting without pause; the manifest is replaced and SIGHUP sent to
    `python -m service`, which forwards it to its workers. Every request succeeds; then the new set serves
    on every worker."""
    folder = tmp_path / "exported"
    write_models_dir(folder)
    failures, served, stop = [], [0] * 8, threading.Event()

    def client(url: str, index: int) -> None:
        paths = [f"/sample?model=gan&seed={index}", "/generate?digit=3", "/v2/models/cgan/ready"]
        while not stop.is_set():
            for path in paths:
                try:
                    with urllib.request.urlopen(url + path, timeout=10) as response:
                        response.read()
                        assert response.status == 200, f"{path}: {response.status}"
                    served[index] += 1  # each thread its own counter: no lost updates
                except Exception as err:  # any failure at all, not only HTTP errors
                    failures.append(f"{path}: {err!r}")

    with running_service(folder, workers=2) as service:
        threads = [threading.Thread(target=client, args=(service.url, i)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        new_version(folder)
        os.kill(service.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        seen_new = 0
        while seen_new < 10 and time.monotonic() < deadline:  # ten answers in a row: both workers swapped
            try:
                with urllib.request.urlopen(service.url + "/models/gan-b", timeout=5):
                    seen_new += 1
            except urllib.error.HTTPError:
                seen_new = 0
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(30)
        metrics = urllib.request.urlopen(service.url + "/metrics").read().decode()
    assert failures == [], failures[:5]
    assert seen_new >= 10, "the new model set never served on every worker"
    assert sum(served) > 50
    assert 'digitgen_reloads_total{result="ok"} 1.0' in metrics  # once for the service, not once per worker


# --- the model set: one immutable value, swapped whole --------------------------------------------------

def test_the_served_set_cannot_be_edited_in_place(app_and_client):
    app, _, _ = app_and_client
    models = app.state.models
    with pytest.raises(TypeError):
        models.models["intruder"] = models.models["gan"]
    with pytest.raises(TypeError):
        del models.queues[models.models["gan"].key]
    with pytest.raises(AttributeError):
        models.warmed = False


def test_a_model_that_fails_warm_up_is_left_out_and_its_batcher_closed(tmp_path, monkeypatch):
    from service.runtime.model import ModelRuntime
    write_models_dir(tmp_path)
    original = ModelRuntime.warm

    def warm(self, sizes):
        if self.name == "gan":
            raise RuntimeError("no kernel for this node")
        return original(self, sizes)
    monkeypatch.setattr(ModelRuntime, "warm", warm)
    app = create_app(Settings(models_dir=tmp_path, intra_op_threads=1), warm=False)
    with TestClient(app) as client:
        cold = app.state.models
        gan_batcher = cold.queues[cold.models["gan"].key]
        client.portal.call(app.state.reloader.warm_up)
        warmed = app.state.models
        assert warmed is not cold and list(warmed.models) == ["cgan"] and list(warmed.queues) == [warmed.models["cgan"].key]
        assert not gan_batcher.alive
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert "warm-up failed: no kernel for this node" in ready.json()["left_out"]["gan"]
        assert "warm-up failed" in client.get("/sample", params={"model": "gan"}).json()["detail"]


def test_a_reload_asked_for_during_warm_up_runs_after_it(tmp_path, monkeypatch):
    """Warm-up and reload are the one writer's two steps: a reload waits for warm-up, then sees its set."""
    import asyncio

    from service.runtime.model import ModelRuntime
    write_models_dir(tmp_path)
    original, order = ModelRuntime.warm, []

    def slow_warm(self, sizes):
        time.sleep(0.2)
        order.append(f"warm {self.name}")
        return original(self, sizes)
    monkeypatch.setattr(ModelRuntime, "warm", slow_warm)
    app = create_app(Settings(models_dir=tmp_path, intra_op_threads=1), warm=False)
    with TestClient(app) as client:
        new_version(tmp_path)

        async def both():
            warming = asyncio.create_task(app.state.reloader.warm_up())
            await asyncio.sleep(0)  # warm-up holds the writer's lock first
            reloaded = await app.state.reloader.reload()
            await warming
            return reloaded
        assert client.portal.call(both)
        assert order == ["warm gan", "warm cgan", "warm gan-b"]  # warm-up decided on the manifest it found; the
        # reload, run after it, found every version of that manifest warmed already
        assert set(app.state.models.models) == {"gan", "cgan", "gan-b"} and app.state.models.ready


def test_an_unreadable_model_file_is_left_out_at_start_up_and_named_at_reload(tmp_path, monkeypatch):
    from service import lifecycle
    write_models_dir(tmp_path)
    original = lifecycle._read

    def unreadable(path):
        if path.name in ("gan.onnx", "gan-v2.onnx"):
            raise PermissionError(13, "Permission denied", str(path))
        return original(path)
    monkeypatch.setattr(lifecycle, "_read", unreadable)
    app = create_app(Settings(models_dir=tmp_path, intra_op_threads=1))
    with TestClient(app) as client:
        wait_ready(client)
        left_out = client.get("/readyz").json()["left_out"]
        assert "gan.onnx cannot be read: Permission denied" in left_out["gan"]
        assert client.get("/generate", params={"digit": 2}).status_code == 200  # cgan serves
        new_version(tmp_path)
        assert not client.portal.call(app.state.reloader.reload)
        reason = client.get("/readyz").json()["left_out"]["gan"]
        assert "gan-v2.onnx cannot be read: Permission denied" in reason and "warm-up" not in reason


# --- versions -----------------------------------------------------------------------------------------

def add_gan_version(folder: Path, serve: bool = True) -> str:
    """A second version of gan, written as export writes one (its own file, named by its content), listed
    beside the first; `serve`: unpinned requests get it. Its version."""
    from onnx_fixtures import entry_for, tiny_generator
    tiny_generator(folder / "next.onnx", 8, seed=11)
    entry = entry_for(folder / "next.onnx", "gan", 8, 0)
    (folder / "gan").mkdir(exist_ok=True)
    (folder / "next.onnx").rename(folder / "gan" / f"{entry.version}.onnx")
    entry = entry.model_copy(update={"file": f"gan/{entry.version}.onnx"})
    manifest = Manifest.model_validate_json((folder / "manifest.json").read_text()).upsert(entry, serve=serve)
    (folder / "manifest.json.tmp").write_text(manifest.to_json())
    (folder / "manifest.json.tmp").replace(folder / "manifest.json")
    return entry.version


def test_a_pinned_version_keeps_its_bytes_and_etag_when_the_name_moves_to_another(app_and_client):
    app, client, folder = app_and_client
    first = app.state.models.models["gan"].entry.version
    pinned = {"model": "gan", "seed": 3, "version": first}
    before = client.get("/sample", params=pinned)
    assert before.headers["cache-control"] == "public, max-age=31536000, immutable"
    unpinned_before = client.get("/sample", params={"model": "gan", "seed": 3})
    assert unpinned_before.headers["cache-control"] == "public, max-age=60"  # the name may move
    second = add_gan_version(folder)
    assert reload(app, client)
    after = client.get("/sample", params=pinned)
    assert (after.content, after.headers["etag"]) == (before.content, before.headers["etag"])  # by construction
    moved = client.get("/sample", params={"model": "gan", "seed": 3})
    assert moved.headers["x-model-version"] == second and moved.content != unpinned_before.content
    assert moved.headers["etag"] != unpinned_before.headers["etag"]  # a revalidation gets the new one
    described = client.get("/models/gan").json()
    assert {v["version"]: v["served_unpinned"] for v in described["versions"]} == {first: False, second: True}
    missing = client.get("/sample", params={"model": "gan", "version": "0" * 12})
    assert missing.status_code == 404 and first in missing.json()["detail"] and second in missing.json()["detail"]


def test_a_version_listed_but_not_served_answers_only_when_pinned(app_and_client):
    app, client, folder = app_and_client
    served = app.state.models.models["gan"].entry.version
    trial = add_gan_version(folder, serve=False)
    assert reload(app, client)
    assert client.get("/sample", params={"model": "gan", "seed": 1}).headers["x-model-version"] == served
    pinned = client.get("/sample", params={"model": "gan", "seed": 1, "version": trial})
    assert pinned.status_code == 200 and pinned.headers["x-model-version"] == trial
    v2 = client.post(f"/v2/models/gan/versions/{trial}/infer", json={"inputs": [
        {"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]})
    assert v2.status_code == 200 and v2.json()["model_version"] == trial
    assert sorted(client.get("/v2/models/gan").json()["versions"]) == sorted([served, trial])


def test_a_file_emptied_under_an_unchanged_entry_is_refused_at_the_reload(app_and_client):
    app, client, folder = app_and_client
    (folder / "cgan.onnx").write_bytes(b"")
    assert not reload(app, client)
    reason = client.get("/readyz").json()["left_out"]["cgan"]
    assert "cgan.onnx is not the file the manifest names" in reason
    assert client.get("/generate", params={"digit": 3}).status_code == 200  # the loaded session serves on


def test_a_storm_of_reload_signals_coalesces_into_at_most_two_reloads(app_and_client, monkeypatch):
    """Twenty SIGHUPs while a reload of a bad model runs: one more reload after it, not twenty gates."""
    import asyncio
    app, client, folder = app_and_client
    new_version(folder, broken=True)
    reloader = app.state.reloader
    ran = []
    original = reloader.reload

    async def counted():
        ran.append(1)
        await asyncio.sleep(0.05)  # long enough for the storm to arrive while it runs
        return await original()
    monkeypatch.setattr(reloader, "reload", counted)

    async def storm():
        for _ in range(20):
            reloader.request()
            await asyncio.sleep(0.001)
        while reloader._reloading:
            await asyncio.sleep(0.01)
    client.portal.call(storm)
    assert len(ran) == 2
    assert 'digitgen_reloads_total{result="failed"} 2.0' in client.get("/metrics").text
