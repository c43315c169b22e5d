"""A Triton model repository of the manifest's models: the path to scale out to Triton or KServe.

`python -m service triton-repository OUT` writes, for every model, OUT/<name>/config.pbtxt and
OUT/<name>/1/model.onnx (the exported file's bytes, checked against the manifest's sha256). The config
speaks Triton's ONNX Runtime backend: the same tensors as this service's V2 metadata without the batch
dimension, dynamic batching with a short queue delay, one instance on the CPU (`--gpu`: one on each GPU). Clients keep working
unchanged: Triton answers the same Open Inference Protocol as `/v2` here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.manifest import ModelEntry, load_manifest, sha256_of

QUEUE_DELAY_US = 100  # how long Triton may hold a request for company: about one small batch's run time


class RepositoryError(Exception):
    """The repository cannot be written; the message names the file."""


def _quoted(text: str) -> str:
    """A protobuf text-format string literal: backslash, quote and control characters escaped (octal)."""
    escaped = "".join("\\" + ch if ch in '\\"' else f"\\{ord(ch):03o}" if ord(ch) < 32 else ch for ch in text)
    return f'"{escaped}"'


def config_pbtxt(entry: ModelEntry, max_batch_size: int, gpu: bool) -> str:
    """The model's config.pbtxt (Triton's ModelConfig in protobuf text format)."""
    tensors = [("z", entry.latent_dim)] + ([("y", entry.num_classes)] if entry.conditional else [])
    inputs = ",\n".join(f"  {{ name: {_quoted(name)} data_type: TYPE_FP32 dims: [ {width} ] }}"
                        for name, width in tensors)
    parameters = {"family": entry.family, "dataset": entry.dataset, "sha256": entry.sha256,
                  "class_names": ",".join(entry.class_names),
                  "metrics": json.dumps(entry.metrics, separators=(",", ":"))}
    described = "\n".join(f"parameters {{ key: {_quoted(key)} value: {{ string_value: {_quoted(value)} }} }}"
                          for key, value in parameters.items())
    dims = ", ".join(str(d) for d in entry.image_shape)
    return (f"name: {_quoted(entry.name)}\n"
            f'platform: "onnxruntime_onnx"\n'
            f"max_batch_size: {max_batch_size}\n"
            f"input [\n{inputs}\n]\n"
            f'output [\n  {{ name: "image" data_type: TYPE_FP32 dims: [ {dims} ] }}\n]\n'
            f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}\n"
            f"instance_group [ {{ count: 1 kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
            f"{described}\n")


def write_repository(models_dir: Path, out: Path, max_batch_size: int, gpu: bool = False) -> list[str]:
    """Write every manifest model, the version it serves unpinned, into `out` (replacing earlier versions of
    them); their names."""
    manifest = load_manifest(models_dir)
    out.mkdir(parents=True, exist_ok=True)
    for entry in [manifest.model(name) for name in manifest.names]:
        source = models_dir / entry.file
        if not source.is_file() or sha256_of(source) != entry.sha256:
            raise RepositoryError(f"{source}: missing, or its sha256 differs from the manifest's")
        folder = out / entry.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        for target, write in ((folder / "1" / "model.onnx", lambda tmp, source=source: shutil.copyfile(source, tmp)),
                              (folder / "config.pbtxt",
                               lambda tmp, entry=entry: tmp.write_text(config_pbtxt(entry, max_batch_size, gpu)))):
            tmp = target.with_name(f".{target.name}.tmp")
            write(tmp)
            tmp.replace(target)  # atomic: Triton polling the folder never reads half a file
    return [entry.name for entry in manifest.models]
