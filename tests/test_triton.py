"""The Triton model repository (`python -m service triton-repository`), checked against Triton's own
ModelConfig schema, and the README's tritonclient program run against this service."""

from __future__ import annotations

import json
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


def test_every_version_becomes_a_triton_version_and_the_served_one_is_the_highest(models_dir, tmp_path):
    from test_reload import add_gan_version
    served = load_manifest(models_dir).model("gan").version
    trial = add_gan_version(models_dir, serve=False)
    assert service_cli(["triton-repository", str(tmp_path / "repo"), "--models-dir", str(models_dir)]) == 0
    folder = tmp_path / "repo" / "gan"
    config = parse(folder / "config.pbtxt")
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert json.loads(config.parameters["versions"].string_value) == {"1": trial, "2": served}
    assert sha256_of(folder / "2" / "model.onnx").startswith(served) and sha256_of(folder / "1" / "model.onnx").startswith(trial)
    assert config.parameters["sha256"].string_value.startswith(served)


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


def test_tritonclient_lists_the_versions_and_pins_one_over_http_and_grpc(models_dir):
    """V2 versions as Triton's own client sees them: metadata lists every version, and an infer that names
    one is answered by it (a request naming none by the version served unpinned)."""
    import numpy as np
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client
    from test_reload import add_gan_version
    from tritonclient.utils import InferenceServerException
    served = load_manifest(models_dir).model("gan").version
    trial = add_gan_version(models_dir, serve=False)
    port = free_port()
    z = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with running_service(models_dir, grpc_port=str(port)) as service:
        for module, url in ((http_client, service.url.removeprefix("http://")), (grpc_client, f"127.0.0.1:{port}")):
            client = module.InferenceServerClient(url)
            metadata = client.get_model_metadata("gan")
            versions = metadata["versions"] if isinstance(metadata, dict) else list(metadata.versions)
            assert sorted(versions) == sorted([served, trial])
            for pinned in ("", trial, served):
                tensor = module.InferInput("z", [2, 8], "FP32")
                tensor.set_data_from_numpy(z)
                result = client.infer("gan", [tensor], model_version=pinned)
                response = result.get_response()
                version = response["model_version"] if isinstance(response, dict) else response.model_version
                assert version == (pinned or served) and result.as_numpy("image").shape == (2, 1, 28, 28)
            assert client.is_model_ready("gan", trial)
            try:  # HTTP answers 400 (not ready); gRPC NOT_FOUND naming the versions there are
                assert not client.is_model_ready("gan", "0" * 12)
            except InferenceServerException as err:
                assert "has no version '000000000000'" in str(err) and trial in str(err)
