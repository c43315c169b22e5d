"""The Triton model repository (`python -m service triton-repository`), checked against Triton's own
ModelConfig schema, and the README's tritonclient program run against this service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, running_service
from onnx_fixtures import write_models_dir

from service.__main__ import main as service_cli
from service.manifest import load_manifest, sha256_of

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")  # tritonclient[grpc], dev extra

ROOT = Path(__file__).parent.parent


def parse(path: Path):
    """Strict: an unknown or misspelt field is an error, as in Triton."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def models_dir(tmp_path):
    write_models_dir(tmp_path / "exported")
    return tmp_path / "exported"


def test_every_model_becomes_a_triton_model_with_the_same_bytes(models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIGITGEN_BATCH_MAX_SIZE", "32")
    assert service_cli(["triton-repository", str(tmp_path / "repo"), "--models-dir", str(models_dir)]) == 0
    assert "wrote gan, cgan" in capsys.readouterr().out
    for entry in load_manifest(models_dir).models:
        folder = tmp_path / "repo" / entry.name
        assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
        assert sha256_of(folder / "1" / "model.onnx") == entry.sha256
        config = parse(folder / "config.pbtxt")
        assert (config.name, config.platform, config.max_batch_size) == (entry.name, "onnxruntime_onnx", 32)
        widths = [entry.latent_dim] + ([entry.num_classes] if entry.conditional else [])
        assert [(t.name, list(t.dims)) for t in config.input] == list(zip(["z", "y"], [[w] for w in widths]))
        assert all(t.data_type == model_config_pb2.TYPE_FP32 for t in [*config.input, *config.output])
        assert [(t.name, list(t.dims)) for t in config.output] == [("image", [1, 28, 28])]
        assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        assert config.parameters["family"].string_value == entry.family
        assert config.parameters["sha256"].string_value == entry.sha256


def test_gpu_instances_and_a_rewrite_in_place(models_dir, tmp_path):
    for _ in range(2):  # writing again over an existing repository replaces its files
        assert service_cli(["triton-repository", str(tmp_path / "repo"), "--models-dir", str(models_dir),
                            "--gpu"]) == 0
    kinds = [g.kind for g in parse(tmp_path / "repo" / "cgan" / "config.pbtxt").instance_group]
    assert kinds == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert not list((tmp_path / "repo").rglob(".*.tmp"))


def test_a_misspelt_field_would_fail_the_schema(tmp_path):
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "x"\nplatfrom: "onnxruntime_onnx"\n')
    with pytest.raises(text_format.ParseError, match="platfrom"):
        parse(bad)


def test_a_model_file_that_differs_from_the_manifest_is_refused_by_name(models_dir, tmp_path, capsys):
    (models_dir / "gan.onnx").write_bytes(b"not the model")
    assert service_cli(["triton-repository", str(tmp_path / "repo"), "--models-dir", str(models_dir)]) == 2
    assert "gan.onnx: missing, or its sha256 differs from the manifest's" in capsys.readouterr().err


def test_the_bundled_models_make_a_valid_repository(tmp_path):
    assert service_cli(["triton-repository", str(tmp_path / "repo"), "--models-dir", str(ROOT / "exported")]) == 0
    for entry in load_manifest(ROOT / "exported").models:
        assert parse(tmp_path / "repo" / entry.name / "config.pbtxt").name == entry.name


def readme_client_program(marker: str = "tritonclient example") -> str:
    """A tritonclient program the README shows (the python block after its marker)."""
    text = (ROOT / "service" / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert block, f"README: the {marker} is missing"
    return block.group(1)


def test_the_readme_tritonclient_program_runs_against_the_service(models_dir, tmp_path):
    program = tmp_path / "client.py"
    program.write_text(readme_client_program())
    with running_service(models_dir) as service:
        done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120,
                              env=os.environ | {"DIGITGEN_V2_URL": service.url.removeprefix("http://"),
                                                "DIGITGEN_V2_MODEL": "cgan"})
    assert done.returncode == 0, done.stderr
    assert "cgan: 4 images (4, 1, 28, 28)" in done.stdout


def test_the_readme_grpc_program_runs_against_the_service(models_dir, tmp_path):
    port = free_port()
    program = tmp_path / "grpc_client.py"
    program.write_text(readme_client_program("tritonclient grpc example"))
    with running_service(models_dir, grpc_port=str(port)):
        done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120,
                              env=os.environ | {"DIGITGEN_GRPC_URL": f"127.0.0.1:{port}"})
    assert done.returncode == 0, done.stderr
    assert "cgan over gRPC: 4 images (4, 1, 28, 28)" in done.stdout
