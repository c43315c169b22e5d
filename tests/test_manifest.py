"""The manifest: one pydantic model that the export writes and the service reads."""

from __future__ import annotations

import json

import pytest
from onnx_fixtures import write_models_dir

from service.manifest import Manifest, ManifestError, load_manifest, parse_manifest


@pytest.fixture
def manifest_json(tmp_path) -> dict:
    write_models_dir(tmp_path)
    return json.loads((tmp_path / "manifest.json").read_text())


def test_round_trip_is_lossless(tmp_path):
    written = write_models_dir(tmp_path)
    read = load_manifest(tmp_path)
    assert read == written and parse_manifest(read.to_json()) == written


def test_upsert_replaces_by_name_and_sets_defaults(tmp_path):
    manifest = write_models_dir(tmp_path)
    changed = manifest.model("gan").model_copy(update={"latent_dim": 3})
    updated = manifest.upsert(changed, default_for=("interpolate",))
    assert [m.name for m in updated.models] == ["cgan", "gan"] and updated.model("gan").latent_dim == 3
    assert updated.defaults.interpolate == "gan" and updated.defaults.generate == "cgan"


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["models"][0].pop("sha256"), "models.0.sha256"),
    (lambda m: m["models"][0].update(sha256="abc"), "models.0.sha256"),
    (lambda m: m["models"][1].update(latent_dim=0), "models.1.latent_dim"),
    (lambda m: m["models"][1].update(file="../../etc/passwd"), "models.1.file"),
    (lambda m: m["models"][1].update(num_classes=0), "models.1"),
    (lambda m: m["models"][0].update(surprise=1), "models.0.surprise"),
    (lambda m: m["models"][0]["training"].pop("epochs"), "models.0.training.epochs"),
    (lambda m: m.update(schema_version=3), "schema_version"),
    (lambda m: m["models"][1].update(file="gan/../../x.onnx"), "models.1.file"),
    (lambda m: m["models"][0].update(version="0123456789ab"), "is not its file's"),
    (lambda m: m.update(rollouts={"gan": {"default": "0123456789ab"}}), "rollouts.gan.default"),
    (lambda m: m["defaults"].update(sample="missing"), "defaults.sample"),
    (lambda m: m["defaults"].update(generate="gan"), "defaults.generate"),
    (lambda m: m["models"].append(m["models"][0]), "listed once"),
])
def test_malformed_manifest_is_rejected_naming_the_field(manifest_json, edit, field):
    edit(manifest_json)
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        parse_manifest(json.dumps(manifest_json), "manifest.json")


def test_unreadable_manifest_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_empty_manifest_is_valid():
    assert Manifest().models == [] and parse_manifest(Manifest().to_json()).defaults.sample is None


def test_a_model_lists_its_versions_and_rollouts_names_the_one_served(tmp_path):
    from onnx_fixtures import entry_for, tiny_generator
    manifest = write_models_dir(tmp_path)
    tiny_generator(tmp_path / "gan-next.onnx", 8, seed=5)
    older, newer = manifest.model("gan"), entry_for(tmp_path / "gan-next.onnx", "gan", 8, 0)
    assert older.version == older.sha256[:12] and older.key == f"gan@{older.version}"
    trial = manifest.upsert(newer, serve=False)  # listed, not served unpinned
    assert trial.model("gan") == older and [e.version for e in trial.versions("gan")] == [older.version, newer.version]
    served = trial.upsert(newer)
    assert served.model("gan") == newer and served.rollouts["gan"].default == newer.version
    assert parse_manifest(served.to_json()) == served
    data = json.loads(served.to_json())
    del data["rollouts"]
    with pytest.raises(ManifestError, match="several versions and no rollouts entry"):
        parse_manifest(json.dumps(data))


def test_a_schema_1_manifest_reads_with_versions_derived_from_the_files(manifest_json):
    manifest_json["schema_version"] = 1
    for entry in manifest_json["models"]:
        entry.pop("version", None)
    manifest = parse_manifest(json.dumps(manifest_json))
    assert all(m.version == m.sha256[:12] for m in manifest.models)
