"""The quality gate: a model is scored by its judge before it is served (start-up and reload) and refused,
with the figure named, when it falls short of what its manifest records; the judge's live figure of what
each model serves shows in /metrics and /models/{name}."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import running_service
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from onnx_fixtures import write_models_dir

from service import live_quality, quality
from service.app import create_app
from service.config import Settings
from service.lifecycle import decided_set
from service.manifest import JudgeEntry, Manifest, ManifestError, load_manifest, parse_manifest, sha256_of
from service.metrics import Metrics
from service.modelset import Loader
from service.sampling import latents, one_hot

BUNDLED = Path(__file__).resolve().parents[1] / "exported"
RECORDED_SAMPLES = 2000  # what the tiny models' figures are recorded over (the gate draws the first 1,000)


def tiny_judge(path: Path, patterns: np.ndarray, scale: float = 2.0) -> None:
    """probabilities = softmax(scale * (image - 0.5) . pattern_c / |pattern_c|): reads class c where the image
    follows pattern c. With the tiny cgan's class rows as patterns it reads that model's digits."""
    unit = (patterns / np.linalg.norm(patterns, axis=1, keepdims=True)).T.astype(np.float32)  # [784, classes]
    nodes = [helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
             helper.make_node("Sub", ["flat", "half"], ["centred"]),
             helper.make_node("MatMul", ["centred", "P"], ["raw"]),
             helper.make_node("Mul", ["raw", "scale"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny-judge", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(patterns)])],
        initializer=[numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape"),
                     numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                     numpy_helper.from_array(unit, "P"), numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def weights(path: Path) -> np.ndarray:
    return numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])


def write_gated_dir(folder: Path) -> Manifest:
    """The tiny gan and cgan, a tiny digits judge, and the cgan's figures recorded with it as the export
    records them (training/judge_export.py). The tiny gan draws noise no judge is confident of: below the
    floors (service/admission.py), it is listed without figures, so served ungated."""
    from training.judge_export import measure
    manifest = write_models_dir(folder)
    tiny_judge(folder / "judge-digits.onnx", weights(folder / "cgan.onnx")[6:])  # the cgan's 10 class rows
    judge = JudgeEntry(name="digits", kind="digits", datasets=["mnist", "mnist-5k"], file="judge-digits.onnx",
                       sha256=sha256_of(folder / "judge-digits.onnx"), opset=17,
                       class_names=[str(i) for i in range(10)])
    measured = [m.model_copy(update={"quality": measure(folder, m, judge, RECORDED_SAMPLES)})
                for m in manifest.models if m.name == "cgan"]
    manifest = manifest.upsert_judge(judge, measured)
    (folder / "manifest.json").write_text(manifest.to_json())
    return manifest


def scramble(folder: Path, name: str, file: str | None = None) -> None:
    """Shuffle the model's weights (same graph, same interface) into `file` (default: its own) and write the
    new file's sha256 into the manifest, its recorded figures unchanged."""
    manifest = load_manifest(folder)
    entry = manifest.model(name)
    model = onnx.load(str(folder / entry.file))
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 1:
            tensor.CopyFrom(numpy_helper.from_array(
                np.random.default_rng(7).permutation(values.ravel()).reshape(values.shape), tensor.name))
    target = folder / (file or entry.file)
    onnx.save(model, str(target))
    changed = entry.model_copy(update={"file": target.name, "sha256": sha256_of(target)})
    others = [m for m in manifest.models if m.name != name]  # the file was overwritten: its old version is gone
    rest = manifest.model_copy(update={"models": others, "rollouts": {}})
    (folder / "manifest.json.tmp").write_text(rest.upsert(changed).to_json())
    (folder / "manifest.json.tmp").replace(folder / "manifest.json")


@pytest.fixture
def gated_dir(tmp_path) -> Path:
    write_gated_dir(tmp_path / "exported")
    return tmp_path / "exported"


@contextlib.contextmanager
def started(folder: Path, **settings):
    """A TestClient over `folder`, once its warm-up (and gate) is done."""
    with TestClient(create_app(Settings(models_dir=folder, intra_op_threads=1, **settings))) as client:
        for _ in range(1000):
            if client.app.state.models.warmed:
                break
            time.sleep(0.01)
        yield client


def test_recorded_figures_are_what_the_gate_measures_on_the_same_samples(gated_dir):
    loader = Loader.of(Settings(models_dir=gated_dir, intra_op_threads=1))
    warmed = decided_set(loader)
    judge = warmed.judges.loaded["digits"]
    for model in [warmed.models["cgan"]]:
        recorded = model.entry.quality
        again = quality.gate(model, judge, recorded, samples=RECORDED_SAMPLES)
        assert dict(again.measured) == pytest.approx(recorded.model_dump(include=set(quality.FIGURES),
                                                                         exclude_none=True), abs=1e-6)
        gated = warmed.gated[model.key]
        assert gated is not None and gated.samples == quality.GATE_SAMPLES and not gated.shortfalls
    assert warmed.models["cgan"].entry.quality.conditional_accuracy == 1.0  # the tiny judge reads the cgan


def test_a_model_with_scrambled_weights_is_refused_at_start_up_naming_the_figure(gated_dir, caplog):
    scramble(gated_dir, "cgan")
    with caplog.at_level(logging.ERROR), started(gated_dir) as client:
        reason = client.get("/readyz").json()["left_out"]["cgan"]
        assert reason.startswith("quality gate:") and "conditional_accuracy 0.1" in reason
        assert "confidence 0.0000 over 1000 samples, below the 0.9" in reason
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["gan"]
        assert "quality gate" in client.get("/generate", params={"model": "cgan", "digit": 1}).json()["detail"]
    assert any("cgan" in r.message and "conditional_accuracy" in r.message for r in caplog.records)


def test_a_model_with_scrambled_weights_is_refused_at_reload_and_the_old_one_keeps_serving(gated_dir, caplog):
    with started(gated_dir) as client:
        before = client.get("/generate", params={"digit": 3, "seed": 1}).content
        scramble(gated_dir, "cgan", "cgan-v2.onnx")
        with caplog.at_level(logging.ERROR):
            assert not client.portal.call(client.app.state.reloader.reload)
        left_out = client.get("/readyz").json()["left_out"]["cgan"]
        assert "reload failed, the previous version serves: quality gate:" in left_out
        assert "conditional_accuracy" in left_out
        assert client.get("/generate", params={"digit": 3, "seed": 1}).content == before
        assert 'digitgen_reloads_total{result="failed"} 1.0' in client.get("/metrics").text
    assert any("conditional_accuracy" in r.message for r in caplog.records)


def test_a_manifest_without_figures_loads_with_a_warning(tmp_path, caplog):
    write_models_dir(tmp_path)
    with caplog.at_level(logging.WARNING), started(tmp_path) as client:
        assert client.get("/readyz").json() == {"ready": True, "generation": 1, "models": {"cgan": True, "gan": True},
                                                "left_out": {}}
        assert client.get("/models/gan").json()["quality"] == {"recorded": None, "gate": None, "live": None}
    warned = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    for name in ("gan", "cgan"):
        assert any(w.startswith(f"model {name}@") and w.endswith(": its manifest entry records no quality figures; "
                                                                  "served without the quality gate") for w in warned)


def test_with_the_gate_off_a_scrambled_model_is_served(gated_dir, monkeypatch):
    monkeypatch.setenv("DIGITGEN_QUALITY_GATE", "off")
    assert Settings().quality_gate is False
    scramble(gated_dir, "cgan")
    with started(gated_dir, quality_gate=False) as client:
        assert client.get("/readyz").json()["left_out"] == {}
        assert client.get("/models/cgan").json()["quality"]["gate"] is None


def test_a_judge_that_fails_its_checksum_leaves_the_models_it_gates_out(gated_dir, caplog):
    path = gated_dir / "judge-digits.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with caplog.at_level(logging.ERROR), started(gated_dir) as client:
        left_out = client.get("/readyz").json()["left_out"]
        assert set(left_out) == {"cgan"} and "judge digits is not loaded" in left_out["cgan"]
        assert "sha256" in left_out["cgan"]
    assert any("judge digits not loaded" in r.getMessage() for r in caplog.records)


def test_the_live_confidence_appears_in_metrics_and_in_the_model(gated_dir, monkeypatch):
    monkeypatch.setattr(live_quality, "LIVE_INTERVAL_S", 0.0)  # hand every batch over, so a few requests fill it
    with started(gated_dir) as client:
        for seed in range(10):
            assert client.get("/generate", params={"digit": seed, "seed": seed, "n": 8}).status_code == 200
        for _ in range(500):
            described = client.get("/models/cgan").json()["quality"]
            if described["live"] and described["live"]["samples"] == 10 * live_quality.LIVE_ROWS:
                break
            time.sleep(0.01)
        text = client.get("/metrics").text
        models = client.app.state.models
        served = np.concatenate([models.models["cgan"].run(latents(seed, 8, 6)[:live_quality.LIVE_ROWS],
                                                           one_hot([seed] * live_quality.LIVE_ROWS, 10))
                                 for seed in range(10)])  # the first rows of each response, as handed over
        expected = float((models.judges.loaded["digits"].probabilities(served).max(1) > 0.9).mean())
    assert described["live"] == {"confidence": expected, "samples": 40, "window": live_quality.LIVE_WINDOW}
    version = models.models["cgan"].entry.version
    assert f'digitgen_live_confidence{{model="cgan",version="{version}"}} {expected}' in text
    assert f'digitgen_live_scored_samples{{model="cgan",version="{version}"}} 40.0' in text
    assert described["recorded"]["samples"] == RECORDED_SAMPLES and described["recorded"]["judge"] == "digits"
    assert described["gate"]["samples"] == quality.GATE_SAMPLES
    assert described["gate"]["lowest_allowed"]["conditional_accuracy"] < 1.0


def test_the_live_gauge_is_one_series_per_model_across_workers(gated_dir):
    """Two workers, each scoring its share: one series per model (the lowest live worker's figure), no pid."""
    with running_service(gated_dir, workers=2) as service:
        deadline = time.monotonic() + 60
        while True:
            for seed in range(8):
                urllib.request.urlopen(f"{service.url}/generate?digit=2&seed={seed}", timeout=10).read()
            text = urllib.request.urlopen(f"{service.url}/metrics", timeout=10).read().decode()
            lines = [line for line in text.splitlines() if line.startswith("digitgen_live_confidence{")]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    version = load_manifest(gated_dir).model("cgan").version
    assert lines == [f'digitgen_live_confidence{{model="cgan",version="{version}"}} 1.0'], text


def test_offers_are_dropped_when_the_scorer_is_behind_never_queued_without_bound(monkeypatch):
    monkeypatch.setattr(live_quality, "LIVE_INTERVAL_S", 0.0)
    release = threading.Event()

    def blocked_set():  # the scorer waits here on its first rows, as behind as it can be
        release.wait()
        return SimpleNamespace(models={})
    live = live_quality.LiveQuality(Metrics(), blocked_set)
    model, output = SimpleNamespace(name="m", key="m@0"), np.zeros((64, 1, 28, 28), np.float32)
    live.offer(model, output)
    while live._rows.qsize():  # until the scorer holds those first rows
        time.sleep(0.001)
    for _ in range(live_quality.LIVE_QUEUE + 10):
        live.offer(model, output)  # returns at once, full queue or not
    assert live._rows.qsize() == live_quality.LIVE_QUEUE
    assert live._rows.queue[0][1].shape == (live_quality.LIVE_ROWS, 1, 28, 28)
    release.set()
    live.close()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["models"][0]["quality"].update(judge="fashion"), "names 'fashion', which is not among the judges"),
    (lambda m: m["judges"][0].update(sha256="0" * 64), "measured with another file of judge digits"),
])
def test_figures_must_name_a_listed_judge_and_its_current_file(gated_dir, edit, message):
    data = json.loads((gated_dir / "manifest.json").read_text())
    edit(data)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(data))


def test_a_manifest_without_judges_writes_back_unchanged(tmp_path):
    write_models_dir(tmp_path)
    text = (tmp_path / "manifest.json").read_text()
    assert "judges" not in text and "quality" not in text and load_manifest(tmp_path).to_json() == text


def test_the_tolerance_is_four_binomial_standard_errors_and_one_sample():
    assert quality.tolerance(0.5, 1000) == pytest.approx(4 * 0.5 / 1000 ** 0.5 + 0.001)
    assert quality.tolerance(1.0, 1000) == pytest.approx(0.001)


@pytest.mark.skipif(not (BUNDLED / "manifest.json").exists(), reason="no bundled models")
def test_the_bundled_models_all_pass_their_gate():
    settings = Settings(models_dir=BUNDLED, intra_op_threads=1)
    manifest = load_manifest(BUNDLED)
    assert manifest.judges and all(m.quality is not None for m in manifest.models)
    warmed = decided_set(Loader.of(settings))
    assert dict(warmed.failures) == {}
    assert set(warmed.gated) == {m.key for m in manifest.models}
    for name, result in warmed.gated.items():
        assert result.samples == quality.GATE_SAMPLES and not result.shortfalls, (name, result.describe())
