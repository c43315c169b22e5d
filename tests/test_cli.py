import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY

from training import data
from training.__main__ import main


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


def test_a_resume_without_epochs_keeps_the_runs_own(capsys, tmp_path):
    """A run of 3 epochs stopped after its first (its config.json says 3, its checkpoint 1): resumed without
    --epochs it trains to 3, not to the family's default of 20."""
    out_dir = tmp_path / "cgan"
    code, _, err = run_cli(capsys, "train", "cgan", "--epochs", "1", "--limit", "64", "--batch-size", "32",
                           "--device", "cpu", "--out", str(out_dir), "--quiet", *tiny_flags("cgan"))
    assert code == 0, err
    record = json.loads((out_dir / "config.json").read_text())
    record["train"]["epochs"] = 3
    (out_dir / "config.json").write_text(json.dumps(record))
    code, out, err = run_cli(capsys, "train", "cgan", "--out", str(out_dir), "--quiet", "--resume", "--device", "cpu")
    assert code == 0, err
    assert "cgan epoch 3/3" in out and "/20" not in out
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.fixture(scope="module")
def one_epoch_cgan(tmp_path_factory):
    """A tiny cgan run of one epoch, trained from the command line (256 digits, batch 32)."""
    out = tmp_path_factory.mktemp("runs") / "cgan"
    assert main(["train", "cgan", "--epochs", "1", "--limit", "256", "--batch-size", "32", "--device", "cpu",
                 "--out", str(out), "--quiet", *tiny_flags("cgan")]) == 0
    return out


@pytest.mark.parametrize("flags, named", [
    (["cgan", "--lr", "0.001"], ["--lr 0.001 (the run: 0.0002)"]),
    (["cgan", "--set", "g_channels=16"], ["--set g_channels=16 (the run: 8)"]),
    (["cgan", "--latent-dim", "4"], ["--latent-dim 4 (the run: 8)"]),
    (["cgan", "--seed", "3", "--no-amp"], ["--seed 3 (the run: 0)", "--no-amp True (the run: False)"]),
    (["gan", "--limit", "256"], ["MODEL gan (the run: cgan)"]),
])
def test_a_resume_with_flags_that_differ_from_the_run_is_refused_naming_each(capsys, one_epoch_cgan, flags, named):
    before = (one_epoch_cgan / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", *flags, "--epochs", "2", "--out", str(one_epoch_cgan), "--quiet",
                           "--resume", "--device", "cpu")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert all(flag in err for flag in named), err
    assert (one_epoch_cgan / "metrics.jsonl").read_text() == before  # nothing trained


def test_a_resume_repeating_the_runs_own_flags_continues_it(capsys, one_epoch_cgan, tmp_path):
    """The flags a run started with, or --epochs, --device and --data-dir, may be given again."""
    code, out, err = run_cli(capsys, "train", "cgan", "--epochs", "2", "--limit", "256", "--batch-size", "32",
                             "--data-dir", str(tmp_path), "--out", str(one_epoch_cgan), "--quiet", "--resume",
                             "--device", "cpu", *tiny_flags("cgan"))
    assert code == 0, err
    assert "cgan epoch 2/2" in out
    assert json.loads((one_epoch_cgan / "config.json").read_text())["train"]["data_dir"] == str(tmp_path)


def test_a_new_run_takes_every_flag_even_with_resume(capsys, tmp_path):
    """--resume on a folder with no run yet starts one (as `make train` does) from all the flags."""
    code, _, err = run_cli(capsys, "train", "gan", "--epochs", "1", "--limit", "64", "--batch-size", "32",
                           "--device", "cpu", "--out", str(tmp_path / "gan"), "--quiet", "--resume",
                           "--set", "g_channels=8", "--set", "d_channels=8", "--latent-dim", "5")
    assert code == 0, err
    assert json.loads((tmp_path / "gan" / "config.json").read_text())["model_config"]["latent_dim"] == 5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor compiles its CPU kernels with a C++ compiler")
def test_a_compiled_run_trains_resumes_with_its_own_choice_and_exports(capsys, tmp_path):
    """The smallest family, so the one-off compiles take seconds; the GANs' steps are compiled the same way
    (tests/benchmarks/train_throughput.py --compile runs every family)."""
    from training.export import export_onnx
    from training.loop import load_run
    from training.train_command import parse_train_flags, run_train

    out_dir = tmp_path / "vae-dense"
    base = ["vae-dense", "--limit", "64", "--batch-size", "32", "--device", "cpu", "--out", str(out_dir), "--quiet"]
    result = run_train(parse_train_flags([*base, "--epochs", "1", "--compile", *tiny_flags("vae-dense")]))
    assert all(isinstance(net, torch._dynamo.eval_frame.OptimizedModule) for net in result.trainer.train_nets.values())
    saved = torch.load(out_dir / "checkpoint.pt", weights_only=True)["trainer"]["nets"]
    assert not any("_orig_mod" in key for state in saved.values() for key in state)  # loadable uncompiled

    result = run_train(parse_train_flags([*base, "--epochs", "2", "--resume"]))  # no --compile: the run's own
    assert json.loads((out_dir / "config.json").read_text())["train"]["compile"] is True
    assert isinstance(result.trainer.train_nets["model"], torch._dynamo.eval_frame.OptimizedModule)
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 2

    trainer, _, _ = load_run(out_dir)
    export_onnx(trainer.sampler(), trainer.num_classes, tmp_path / "vae-dense.onnx")
    assert (tmp_path / "vae-dense.onnx").stat().st_size > 0


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
                 "--device", "--out", "--resume", "--loss", "--set", "--r1", "--lr-decay-start", "--ema-decay", "--compile"):
        assert flag in text


def test_evaluate_refuses_flags_that_do_not_apply_by_name(capsys, tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    for flag in (["--raw"], ["--sharpen", "0.5"]):
        code, _, err = run_cli(capsys, "evaluate", str(onnx_file), *flag)
        assert code == 2 and f"{flag[0]}: an .onnx file holds one graph" in err
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "no-run-here"), "--sharpen", "2")
    assert code == 2 and "--sharpen 2: the output temperature must lie strictly between 0 and 1" in err
    with pytest.raises(SystemExit):
        main(["evaluate", str(onnx_file), "--truncation", "0"])
    assert "--truncation" in capsys.readouterr().err


def test_the_evaluator_command_describes_the_cached_evaluator(capsys, evaluator_dir, monkeypatch, tmp_path):
    """A cached evaluator is described without its data: no digits where --data-dir (or data/mnist) points."""
    monkeypatch.setattr("training.evaluator.DEFAULT_CACHE", evaluator_dir)
    monkeypatch.chdir(tmp_path)  # no data/mnist here, and nothing may be downloaded
    code, out, err = run_cli(capsys, "evaluator", "--data-dir", str(tmp_path / "empty"))
    assert code == 0, err
    assert "test_accuracy" in out and "temperature" in out and "test_ece" in out
    assert not (tmp_path / "empty").exists() and not (tmp_path / "data").exists()


def test_a_data_dir_that_is_a_file_is_named_as_such(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("training.evaluator.DEFAULT_CACHE", tmp_path / "no-evaluator-yet")
    (tmp_path / "mnist.gz").write_bytes(b"")
    code, _, err = run_cli(capsys, "evaluator", "--data-dir", str(tmp_path / "mnist.gz"))
    assert code == 2 and f"--data-dir {tmp_path / 'mnist.gz'}: a file, not a folder" in err
    assert err.count("\n") == 1, err  # one line, not a list of the places it tried
