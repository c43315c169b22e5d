"""The judge as a file: the calibrated evaluator exported to ONNX beside the models, listed in the manifest,
and each model's figures measured with that file, as the service's quality gate measures them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY_MODEL, tiny_setup

from service import quality
from service.config import Settings
from service.lifecycle import decided_set
from service.manifest import load_manifest, sha256_of
from service.modelset import Loader
from training import judge_export
from training.__main__ import main as cli
from training.export import ExportError, export_run
from training.loop import train


@pytest.fixture(scope="module")
def tiny_cgan_run(tmp_path_factory, few_digits):
    out = tmp_path_factory.mktemp("runs") / "cgan"
    config, mconfig = tiny_setup("cgan", epochs=1)
    train(config, mconfig, out, progress=False, data=few_digits, log=lambda *_: None)
    return out


def test_the_judge_file_gives_the_calibrated_evaluators_probabilities(judge, tmp_path):
    entry = judge_export.export_judge(judge, "digits", tmp_path)
    assert (entry.file, entry.sha256) == ("judge-digits.onnx", sha256_of(tmp_path / "judge-digits.onnx"))
    assert {"mnist", "mnist-5k"} <= set(entry.datasets) and entry.class_names == judge.report["class_names"]
    assert entry.report["temperature"] == pytest.approx(judge.temperature, abs=1e-6) and entry.confident == 0.9
    digits = judge.reference.images[:300]
    session = ort.InferenceSession(str(tmp_path / entry.file), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": digits.numpy()})[0]
    np.testing.assert_allclose(got, judge.predict(digits)[1].numpy(), atol=1e-5)
    assert (tmp_path / entry.file).stat().st_size < 8 * 2**20


def test_a_judge_that_fails_parity_is_not_written(judge, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        judge_export.export_judge(judge, "digits", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_lists_the_judge_and_records_figures_the_gate_reproduces(tiny_cgan_run, tmp_path, evaluator_dir):
    out = tmp_path / "exported"
    entry = export_run(tiny_cgan_run, "tiny-cgan", out, samples=400, evaluator_dir=evaluator_dir,
                       log=lambda *_: None, accept_worse=TINY_MODEL)
    manifest = load_manifest(out)
    assert [j.name for j in manifest.judges] == ["digits"] and (out / "judge-digits.onnx").is_file()
    assert entry.quality.judge_sha256 == manifest.judges[0].sha256 and entry.quality.samples == 400
    assert entry.quality.conditional_accuracy == entry.metrics["conditional_accuracy"]  # the same judge, in ONNX
    settings = Settings(models_dir=out, intra_op_threads=1)
    loader = Loader.of(settings)
    judges = loader.judges(manifest)
    again = quality.gate(loader.open(entry), judges.loaded["digits"], entry.quality, samples=400)
    assert dict(again.measured) == pytest.approx(entry.quality.model_dump(include=set(quality.FIGURES)), abs=1e-6)
    # a model trained for seconds is below the floors: listed (--accept-worse), and never served
    assert "below the 0.9000 the floor for its kind of model allows" in decided_set(loader).failures["tiny-cgan"]


def test_the_judge_command_renews_the_judge_and_measures_every_model_again(tiny_cgan_run, tmp_path, evaluator_dir,
                                                                           monkeypatch, capsys):
    out = tmp_path / "exported"
    export_run(tiny_cgan_run, "tiny-cgan", out, samples=200, evaluator_dir=evaluator_dir, log=lambda *_: None,
               accept_worse=TINY_MODEL)
    (out / "judge-digits.onnx").unlink()
    monkeypatch.setattr("training.evaluator.DEFAULT_CACHE", evaluator_dir)
    assert cli(["judge", "--models-dir", str(out), "--dataset", "mnist-5k", "--samples", "300"]) == 0
    manifest = load_manifest(out)
    assert manifest.judges[0].sha256 == sha256_of(out / "judge-digits.onnx")
    assert manifest.model("tiny-cgan").quality.samples == 300
    assert "tiny-cgan: quality by judge digits over 300 samples" in capsys.readouterr().out
