import dataclasses
import json
import subprocess
import sys

import pytest

from training import data
from training.__main__ import main

from conftest import TINY


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_model_and_dataset(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for name in ("vae", "vae-dense", "cvae", "gan", "cgan", "wgan", "wgan-clip", "mnist-5k", "fashion-mnist"):
        assert name in out


def tiny_flags(model):
    return [arg for key, value in TINY[model].items() for arg in ("--set", f"{key}={value}")]


def test_train_then_resume_from_the_command_line(capsys, tmp_path):
    out_dir = tmp_path / "cgan"
    args = ["train", "cgan", "--epochs", "1", "--limit", "256", "--batch-size", "32", "--device", "cpu",
            "--out", str(out_dir), "--quiet", *tiny_flags("cgan")]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "cgan epoch 1/1" in out and "img/s" in out
    code, out, err = run_cli(capsys, "train", "cgan", "--epochs", "2", "--out", str(out_dir), "--quiet",
                             "--resume", "--device", "cpu")
    assert code == 0, err
    assert "resuming" in out and "cgan epoch 2/2" in out
    config = json.loads((out_dir / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["train"]["limit"] == 256  # kept from the first run
    assert config["model_config"]["g_channels"] == 8
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv, named", [
    (["train", "cgan", "--epochs", "0"], "--epochs"),
    (["train", "cgan", "--lr", "-1"], "--lr"),
    (["train", "cgan", "--device", "tpu"], "--device"),
    (["train", "cgan", "--dataset", "cifar"], "--dataset"),
    (["train", "dcgan"], "MODEL"),
    (["train", "cgan", "--bogus"], "--bogus"),
    (["train", "cgan", "--set", "nokey"], "--set"),
])
def test_bad_flags_fail_with_a_message_naming_them(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["train", "gan", "--set", "g_width=3"], "--set g_width"),
    (["train", "vae", "--loss", "minimax"], "--loss minimax"),
    (["train", "gan", "--ema-decay", "1.5"], "--ema-decay 1.5"),
    (["train", "wgan", "--r1", "1"], "--r1 1"),
    (["train", "gan", "--lr-decay-start", "2"], "--lr-decay-start 2"),
    (["train", "vae", "--dataset", "mnist", "--data-dir", "EMPTY"], "missing train-images-idx3-ubyte.gz"),
])
def test_bad_values_fail_with_an_error_line_not_a_traceback(capsys, tmp_path, argv, named, monkeypatch):
    offline = dataclasses.replace(data.MNIST_SOURCE, mirrors=("http://127.0.0.1:9/",))  # refused at once
    monkeypatch.setattr(data, "MNIST_SOURCE", offline)
    argv = [str(tmp_path / "empty") if arg == "EMPTY" else arg for arg in argv]
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2
    assert err.startswith("error: ") and named in err and "Traceback" not in err


def test_help_documents_every_flag():
    text = subprocess.run([sys.executable, "-m", "training", "train", "--help"], capture_output=True,
                          text=True, check=True).stdout
    for flag in ("--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--latent-dim", "--seed",
                 "--device", "--out", "--resume", "--loss", "--set", "--r1", "--lr-decay-start", "--ema-decay"):
        assert flag in text


def test_evaluate_refuses_flags_that_do_not_apply_by_name(capsys, tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    code, _, err = run_cli(capsys, "evaluate", str(onnx_file), "--raw")
    assert code == 2 and "--raw" in err
    with pytest.raises(SystemExit):
        main(["evaluate", str(onnx_file), "--truncation", "0"])
    assert "--truncation" in capsys.readouterr().err


def test_the_evaluator_command_describes_the_cached_evaluator(capsys, evaluator_dir, monkeypatch):
    monkeypatch.setattr("training.evaluate.DEFAULT_CACHE", evaluator_dir)
    code, out, err = run_cli(capsys, "evaluator")
    assert code == 0, err
    assert "test_accuracy" in out and "temperature" in out and "test_ece" in out
