"""The one lifecycle (service/lifecycle.py, service/coordinator.py): decided once for every worker, each
file gated once, all workers switch or none does; a replacement serves the others' set; canaries."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import running_service, wait_ready, wait_until
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir
from test_quality import scramble, write_gated_dir
from test_reload import add_gan_version

from service import lifecycle as lifecycle_module
from service.app import create_app
from service.config import Settings
from service.gate_cache import GateCache
from service.lifecycle import Lifecycle
from service.manifest import Canary, Rollout, load_manifest
from service.modelset import ReloadError
from service.plan import make_plan
from service.quality import Measured


def get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def json_of(url: str) -> dict:
    import json
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def lifecycle_over(folder: Path, cache: Path) -> Lifecycle:
    settings = Settings(models_dir=folder, intra_op_threads=1, gate_cache_dir=cache)
    return Lifecycle(settings, make_plan(settings, quiet=True))


def counting_measure(monkeypatch) -> list[str]:
    """Every measurement the gate really makes (not taken from its cache), by model version."""
    measured, original = [], lifecycle_module.measure

    def counted(model, judge, recorded, samples=None):
        measured.append(model.key)
        return original(model, judge, recorded) if samples is None else original(model, judge, recorded, samples)
    monkeypatch.setattr(lifecycle_module, "measure", counted)
    return measured


# --- the gate, once per file ----------------------------------------------------------------------------

def test_a_bad_version_is_gated_once_however_often_the_reload_is_asked_for_and_after_a_restart(tmp_path,
                                                                                               monkeypatch):
    folder = tmp_path / "exported"
    write_gated_dir(folder)
    measured = counting_measure(monkeypatch)
    first = lifecycle_over(folder, tmp_path / "cache")
    first.commit(first.decide(strict=False))
    assert measured == [load_manifest(folder).model("cgan").key]
    scramble(folder, "cgan", "cgan-v2.onnx")
    for _ in range(20):
        with pytest.raises(ReloadError, match="quality gate: confidence"):
            first.decide(strict=True)
    assert len(measured) == 2  # the scrambled file, once
    restarted = lifecycle_over(folder, tmp_path / "cache")  # a new process, the same cache folder
    assert "quality gate" in restarted.decide(strict=False).refused["cgan"]
    assert len(measured) == 2
    monkeypatch.setattr("service.gate_cache.ort.__version__", "9.99.0")  # another ONNX Runtime: measured again
    lifecycle_over(folder, tmp_path / "cache").decide(strict=False)
    assert len(measured) == 3


def test_an_unwritable_cache_folder_keeps_measurements_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = GateCache(blocker / "gates")
    assert cache.folder is None and "kept in memory only" in caplog.text
    cache.put("k", Measured(10, {"confidence": 0.5}, 0.1))
    assert cache.get("k") == Measured(10, {"confidence": 0.5}, 0.1)


def test_a_damaged_cache_entry_is_measured_again(tmp_path):
    cache = GateCache(tmp_path)
    (tmp_path / "k.json").write_text("{not json")
    assert cache.get("k") is None


# --- floors and the version replaced ---------------------------------------------------------------------

def with_figures(monkeypatch, by_version: dict[str, dict]) -> None:
    """The gate measures what `by_version` says of each file (by its version), over 1000 samples."""
    def measure(model, judge, recorded, samples=1000):
        return Measured(1000, by_version[model.entry.version], 0.01)
    monkeypatch.setattr(lifecycle_module, "measure", measure)


def recording(folder: Path, name: str, figures: dict) -> None:
    """The manifest with these figures recorded for `name`'s served version."""
    manifest = load_manifest(folder)
    key = manifest.model(name).key
    models = [m.model_copy(update={"quality": m.quality.model_copy(update=figures)}) if m.key == key else m
              for m in manifest.models]
    (folder / "manifest.json").write_text(manifest.model_copy(update={"models": models}).to_json())


def test_a_new_version_worse_than_the_one_it_replaces_is_refused_unless_its_entry_says_why(tmp_path, monkeypatch):
    folder = tmp_path / "exported"
    write_gated_dir(folder)
    good = {"confidence": 0.99, "min_class_share": 0.098, "conditional_accuracy": 0.99}
    worse = {"confidence": 0.93, "min_class_share": 0.098, "conditional_accuracy": 0.99}  # above every floor
    recording(folder, "cgan", good)
    first = load_manifest(folder).model("cgan")
    scramble(folder, "cgan", "cgan-v2.onnx")  # a new file, listed as the version served unpinned
    recording(folder, "cgan", worse)  # its own figures are what it measures: only the comparison can refuse it
    second = load_manifest(folder).model("cgan")
    with_figures(monkeypatch, {first.version: good, second.version: worse})
    current = lifecycle_over(folder, tmp_path / "cache")
    replaced = load_manifest(folder)
    (folder / "manifest.json").write_text(replaced.model_copy(update={"models": [
        first if m.name == "cgan" else m for m in replaced.models], "rollouts": {}}).to_json())
    current.commit(current.decide(strict=False))  # the first version serves
    (folder / "manifest.json").write_text(replaced.to_json())
    with pytest.raises(ReloadError, match=rf"worse than the version it would replace: confidence 0.9300 against "
                                          rf"0.9900 for version {first.version}"):
        current.decide(strict=True)
    accepted = replaced.model_copy(update={"models": [m.model_copy(update={"accepted_worse": "smaller, faster"})
                                                      if m.key == second.key else m for m in replaced.models]})
    (folder / "manifest.json").write_text(accepted.to_json())
    assert second.key in current.decide(strict=True).admitted


def test_a_conditional_version_that_draws_the_wrong_digit_is_never_served(tmp_path, monkeypatch):
    """Its own recorded figures are as bad as it is (a collapsed run records collapsed figures): the floor
    refuses it where a comparison with them alone would pass it."""
    folder = tmp_path / "exported"
    manifest = write_gated_dir(folder)
    cgan = manifest.model("cgan")
    collapsed = {"confidence": 0.95, "min_class_share": 0.09, "conditional_accuracy": 0.1}
    recorded = cgan.quality.model_copy(update=collapsed)
    listed = manifest.model_copy(update={"models": [m.model_copy(update={"quality": recorded}) if m.name == "cgan"
                                                    else m for m in manifest.models]})
    (folder / "manifest.json").write_text(listed.to_json())
    with_figures(monkeypatch, {cgan.version: collapsed})
    refused = lifecycle_over(folder, tmp_path / "cache").decide(strict=False).refused
    assert "conditional_accuracy 0.1000 over 1000 samples, below the 0.9000 the floor" in refused["cgan"]


# --- canaries -----------------------------------------------------------------------------------------------

def test_a_canary_gets_its_share_of_unpinned_requests_within_binomial_bounds(tmp_path):
    write_models_dir(tmp_path)
    served = load_manifest(tmp_path).model("gan").version
    trial = add_gan_version(tmp_path, serve=False)
    manifest = load_manifest(tmp_path)
    share = 0.3
    rollouts = dict(manifest.rollouts) | {"gan": Rollout(default=served, canary=Canary(version=trial, share=share))}
    (tmp_path / "manifest.json").write_text(manifest.model_copy(update={"rollouts": rollouts}).to_json())
    assert load_manifest(tmp_path).canary("gan")[1] == share  # it writes back and reads again
    n = 600
    with TestClient(create_app(Settings(models_dir=tmp_path, intra_op_threads=1))) as client:
        wait_ready(client)
        versions = Counter(client.get("/sample", params={"model": "gan", "seed": i}).headers["x-model-version"]
                           for i in range(n))
        pinned = {client.get("/sample", params={"model": "gan", "seed": 1, "version": served}).headers[
            "x-model-version"] for _ in range(20)}
        metrics = client.get("/metrics").text
        described = client.get("/models/gan").json()["versions"]
    assert set(versions) == {served, trial} and pinned == {served}  # a pinned request never goes to the canary
    sd = math.sqrt(n * share * (1 - share))
    assert abs(versions[trial] - n * share) < 4 * sd, versions  # 4 standard deviations: fails once in 15,000 runs
    for version in (served, trial):
        count = f'digitgen_queue_wait_seconds_count{{model="gan",version="{version}"}}'
        assert count in metrics  # the two are compared by their version label
    assert {v["version"]: v["canary_share"] for v in described} == {served: None, trial: share}


def test_a_canary_must_be_another_listed_version(tmp_path):
    from service.manifest import ManifestError, parse_manifest
    write_models_dir(tmp_path)
    manifest = load_manifest(tmp_path)
    version = manifest.model("gan").version
    for canary in (version, "0" * 12):
        data = manifest.model_copy(update={"rollouts": {"gan": Rollout(default=version, canary=Canary(
            version=canary, share=0.1))}})
        with pytest.raises(ManifestError, match="rollouts.gan.canary.version"):
            parse_manifest(data.model_dump_json())


# --- several workers: one set ----------------------------------------------------------------------------

def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def all_answers(url: str, path: str, count: int) -> list[dict]:
    """`count` answers from fresh connections: the kernel spreads them over the workers."""
    return [json_of(url + path) for _ in range(count)]


def test_every_worker_switches_and_a_replacement_joins_with_the_set_the_others_serve(tmp_path):
    """A new version, SIGHUP: every worker on generation 2. An emptied file, SIGHUP: refused at the signal,
    every worker keeps generation 2. A worker killed: its replacement serves generation 2, the emptied file's
    model included (from the bytes the supervisor checked), and no request fails meanwhile."""
    write_models_dir(tmp_path)
    with running_service(tmp_path, workers=2) as service:
        assert {a["generation"] for a in all_answers(service.url, "/readyz", 12)} == {1}
        trial = add_gan_version(tmp_path)
        os.kill(service.process.pid, signal.SIGHUP)
        wait_until(lambda: {a["generation"] for a in all_answers(service.url, "/readyz", 12)} == {2},
                   "the workers never all served generation 2", 60)
        (tmp_path / "cgan.onnx").write_bytes(b"")
        os.kill(service.process.pid, signal.SIGHUP)
        wait_until(lambda: all("cgan" in a["left_out"] for a in all_answers(service.url, "/readyz", 12)),
                   "the emptied file was not refused on every worker", 60)
        left_out = {a["left_out"]["cgan"] for a in all_answers(service.url, "/readyz", 12)}
        assert len(left_out) == 1 and "cgan.onnx is not the file the manifest names" in left_out.pop()
        workers = worker_pids(service.process.pid)
        failures: list[str] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                status, _, headers = get(f"{service.url}/generate?digit=3&model=cgan")
                if status != 200:
                    failures.append(str(status))
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = worker_pids(service.process.pid)
            return victim not in now and len(now) == 2
        wait_until(replaced, "the dead worker was never replaced", 60)
        wait_until(lambda: all(a["ready"] for a in all_answers(service.url, "/readyz", 12)), "not ready", 60)
        answers = all_answers(service.url, "/readyz", 20)
        models = all_answers(service.url, "/models", 20)
        stop.set()
        for thread in threads:
            thread.join(30)
    assert {a["generation"] for a in answers} == {2} and {tuple(sorted(a["models"])) for a in answers} == \
        {("cgan", "gan")}
    assert {tuple((m["name"], m["version"]) for m in a["models"]) for a in models} == \
        {tuple((m["name"], m["version"]) for m in models[0]["models"])} and trial in str(models[0])
    # connections the kernel had queued on the killed worker's socket may be lost; no other request fails
    assert len([f for f in failures if f != "000"]) <= 4, failures[:10]


def test_a_storm_of_sighups_with_a_bad_model_fails_at_most_twice_and_leaves_every_worker_serving(tmp_path):
    folder = tmp_path / "exported"
    write_gated_dir(folder)
    with running_service(folder, workers=2) as service:
        before = get(f"{service.url}/generate?digit=3&seed=1")[1]
        scramble(folder, "cgan", "cgan-v2.onnx")
        started = time.monotonic()
        for _ in range(20):
            os.kill(service.process.pid, signal.SIGHUP)
            time.sleep(0.01)

        def failed() -> float:
            text = urllib.request.urlopen(service.url + "/metrics", timeout=10).read().decode()
            line = next((x for x in text.splitlines() if x.startswith('digitgen_reloads_total{result="failed"}')), "")
            return float(line.split()[-1]) if line else 0.0
        wait_until(lambda: failed() >= 1, "the reload never failed", 60)
        time.sleep(2)
        settled = time.monotonic() - started
        count = failed()
        answers = all_answers(service.url, "/readyz", 12)
        after = {get(f"{service.url}/generate?digit=3&seed=1")[1] for _ in range(12)}
    assert count <= 2, count  # twenty signals: the reload under way and one more
    assert settled < 30
    assert {a["generation"] for a in answers} == {1} and all("quality gate" in a["left_out"]["cgan"] for a in answers)
    assert after == {before}


# --- prune ----------------------------------------------------------------------------------------------------

def test_prune_removes_only_the_files_no_manifest_entry_lists(tmp_path, capsys):
    from service.__main__ import main as service_cli
    write_models_dir(tmp_path)
    dropped = add_gan_version(tmp_path)
    manifest = load_manifest(tmp_path)
    listed = [m for m in manifest.models if m.version != dropped]
    (tmp_path / "manifest.json").write_text(manifest.model_copy(update={"models": listed, "rollouts": {}}).to_json())
    (tmp_path / "gan" / ".incoming.onnx").write_bytes(b"half an export")
    (tmp_path / "notes.onnx").write_bytes(b"not in a model's folder: never touched")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert service_cli(["prune", "--models-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {tmp_path / 'gan' / (dropped + '.onnx')}" in out and "would remove 2 unlisted file(s)" in out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == before
    assert service_cli(["prune", "--models-dir", str(tmp_path)]) == 0
    assert "removed 2 unlisted file(s)" in capsys.readouterr().out
    assert not (tmp_path / "gan").exists() and (tmp_path / "notes.onnx").exists()
    for entry in load_manifest(tmp_path).models:
        assert (tmp_path / entry.file).is_file()
    (tmp_path / "manifest.json").write_text("{")
    assert service_cli(["prune", "--models-dir", str(tmp_path)]) == 2
    assert "nothing removed" in capsys.readouterr().err


def test_copy_models_publishes_checked_files_first_and_the_manifest_last(tmp_path, capsys, monkeypatch):
    """A reader of DEST sees the old set or the new one: every file is renamed into place before the
    manifest; a source file that is not the one its manifest lists publishes nothing."""
    from service import copy_models as module
    from service.__main__ import main as service_cli
    source, dest = tmp_path / "source", tmp_path / "dest"
    write_models_dir(source)
    add_gan_version(source)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(module.os, "replace", lambda a, b: (renamed.append(Path(b).name), real_replace(a, b)))
    assert service_cli(["copy-models", str(dest), "--models-dir", str(source)]) == 0
    listed = {entry.file for entry in load_manifest(source).models}
    assert renamed[-1] == "manifest.json" and len(renamed) == len(listed) + 1
    assert (dest / "manifest.json").read_bytes() == (source / "manifest.json").read_bytes()
    for name in listed:
        assert (dest / name).read_bytes() == (source / name).read_bytes()
    assert not [p for p in dest.rglob("*") if "incoming" in p.name]
    assert f"{len(listed)} file(s) copied" in capsys.readouterr().out
    renamed.clear()
    assert service_cli(["copy-models", str(dest), "--models-dir", str(source), "--if-empty"]) == 0
    assert renamed == [] and "manifest kept" in capsys.readouterr().out
    assert service_cli(["copy-models", str(dest), "--models-dir", str(source)]) == 0
    assert renamed == ["manifest.json"]  # the files there already hold the listed bytes
    capsys.readouterr()

    fresh = tmp_path / "fresh"
    (source / next(iter(listed))).write_bytes(b"replaced after export")
    assert service_cli(["copy-models", str(fresh), "--models-dir", str(source)]) == 2
    assert "not the file the manifest lists" in capsys.readouterr().err
    assert not (fresh / "manifest.json").exists() and not [p for p in fresh.rglob("*") if "incoming" in p.name]
    versioned = next(name for name in listed if "/" in name)
    (dest / versioned).write_bytes(b"other bytes under a version's name")
    manifest_before = (dest / "manifest.json").stat().st_mtime_ns
    (source / next(iter(listed))).write_bytes((dest / next(iter(listed))).read_bytes())
    assert service_cli(["copy-models", str(dest), "--models-dir", str(source)]) == 2
    assert "a version's file never changes" in capsys.readouterr().err
    assert (dest / "manifest.json").stat().st_mtime_ns == manifest_before
    assert service_cli(["copy-models", str(fresh), "--models-dir", str(tmp_path / "none")]) == 2
    assert "none/manifest.json: cannot read the manifest" in capsys.readouterr().err


def test_the_checked_copies_are_what_workers_open_and_only_two_generations_are_kept(tmp_path):
    write_models_dir(tmp_path)
    life = lifecycle_over(tmp_path, tmp_path / "cache")
    first = life.decide(strict=False)
    life.commit(first)
    gan = load_manifest(tmp_path).model("gan")
    copy = Path(first.files[gan.sha256])
    assert copy.parent == life.copies and copy.read_bytes() == (tmp_path / gan.file).read_bytes()
    assert oct(life.copies.stat().st_mode & 0o777) == "0o700"
    versions = [add_gan_version(tmp_path) for _ in range(2)]
    for _ in versions:
        life.commit(life.decide(strict=True))
    kept = {p.name for p in life.copies.glob("*.onnx")}
    assert kept == {Path(p).name for p in life.current.files.values()} | \
        {Path(p).name for p in life._previous.files.values()}
    assert copy.name in kept  # gan's first version is still listed (pinned requests), so still kept
    folder = life.copies
    del life
    import gc
    gc.collect()
    assert not folder.exists()
