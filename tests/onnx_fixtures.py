"""Tiny ONNX models that follow the exported interface, built with onnx.helper (no torch, instant).

image = sigmoid(reshape([z, y] @ W)), so different z or y give different images and the output
depends on each row alone, like a real generator in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.manifest import Manifest, ModelEntry, TrainingSummary, sha256_of

SUMMARY = TrainingSummary(epochs=1, seconds=1.0, device="cpu", images_per_s=1.0, torch="test")


def tiny_generator(path: Path, latent_dim: int, num_classes: int = 0, seed: int = 0, side: int = 28) -> None:
    """image [N, 1, side, side] from z [N, latent_dim] (and y [N, num_classes])."""
    weights = np.random.default_rng(seed).standard_normal((latent_dim + num_classes, side * side)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", latent_dim])]
    nodes = []
    features = "z"
    if num_classes:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", num_classes]))
        nodes.append(helper.make_node("Concat", ["z", "y"], ["zy"], axis=1))
        features = "zy"
    nodes += [
        helper.make_node("MatMul", [features, "W"], ["flat"]),
        helper.make_node("Sigmoid", ["flat"], ["pixels"]),
        helper.make_node("Reshape", ["pixels", "shape"], ["image"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", inputs,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, side, side])],
        initializer=[numpy_helper.from_array(weights, "W"),
                     numpy_helper.from_array(np.array([-1, 1, side, side], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def entry_for(path: Path, name: str, latent_dim: int, num_classes: int, side: int = 28) -> ModelEntry:
    return ModelEntry(name=name, family="cgan" if num_classes else "gan", conditional=num_classes > 0,
                      latent_dim=latent_dim, num_classes=num_classes, class_names=[str(i) for i in range(10)],
                      image_shape=(1, side, side), file=path.name, sha256=sha256_of(path), opset=17,
                      dataset="mnist-5k", training=SUMMARY, metrics={"fid": 1.0})


def write_models_dir(folder: Path) -> Manifest:
    """A models folder with an unconditional `gan` and a conditional `cgan` (the defaults)."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_generator(folder / "gan.onnx", 8)
    tiny_generator(folder / "cgan.onnx", 6, 10, seed=1)
    manifest = Manifest(models=[entry_for(folder / "gan.onnx", "gan", 8, 0),
                                entry_for(folder / "cgan.onnx", "cgan", 6, 10)],
                        defaults={"sample": "gan", "generate": "cgan", "interpolate": "cgan"})
    (folder / "manifest.json").write_text(manifest.to_json())
    return manifest


def new_version(folder: Path, broken: bool = False) -> None:
    """The next manifest: gan retrained (a new file), cgan unchanged, gan-b added. Files first, then the
    manifest by rename, as an operator should (a reload never sees half a file). `broken`: gan's file is
    missing."""
    tiny_generator(folder / "gan-v2.onnx", 8, seed=5)
    tiny_generator(folder / "gan-b.onnx", 8, seed=9)
    gan = entry_for(folder / "gan-v2.onnx", "gan", 8, 0)
    if broken:
        gan = gan.model_copy(update={"file": "gan-v3.onnx"})
    manifest = Manifest(models=[gan, entry_for(folder / "cgan.onnx", "cgan", 6, 10),
                                entry_for(folder / "gan-b.onnx", "gan-b", 8, 0)],
                        defaults={"sample": "gan", "generate": "cgan", "interpolate": "cgan"})
    (folder / "manifest.json.tmp").write_text(manifest.to_json())
    (folder / "manifest.json.tmp").replace(folder / "manifest.json")
