"""A Triton model repository of the manifest's models: the path to scale out to Triton or KServe.

`python -m service triton-repository OUT` writes, for every model, OUT/<name>/config.pbtxt and one
OUT/<name>/<n>/model.onnx per version (the exported file's bytes, checked against the manifest's sha256).
Triton numbers versions and serves the highest when a request names none, so the version this service
serves unpinned gets the highest number and the others 1, 2, ... in the manifest's order; the config's
`versions` parameter maps each number to its version here, and `version_policy: { all {} }` loads them all. The config
speaks Triton's ONNX Runtime backend: the same tensors as this service's V2 metadata without the batch
dimension, dynamic batching with a short queue delay, one instance on the CPU (`--gpu`: one on each GPU). Clients keep working
unchanged: Triton answers the same Open Inference Protocol as `/v2` here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.manifest import Manifest, ModelEntry, load_manifest, sha256_of

QUEUE_DELAY_US = 100  # how long Triton may hold a request for company: about one small batch's run time


class RepositoryError(Exception):
    """The repository cannot be written; the message names the file."""


def _quoted(text: str) -> str:
    """A protobuf text-format string literal: backslash, quote and control characters escaped (octal)."""
    escaped = "".join("\\" + ch if ch in '\\"' else f"\\{ord(ch):03o}" if ord(ch) < 32 else ch for ch in text)
    return f'"{escaped}"'


def config_pbtxt(entry: ModelEntry, max_batch_size: int, gpu: bool, numbers: dict[int, str] | None = None) -> str:
    """The model's config.pbtxt (Triton's ModelConfig in protobuf text format); `entry` the version served
    unpinned, `numbers` Triton's version number of each version."""
    numbers = numbers or {1: entry.version}
    tensors = [("z", entry.latent_dim)] + ([("y", entry.num_classes)] if entry.conditional else [])
    inputs = ",\n".join(f"  {{ name: {_quoted(name)} data_type: TYPE_FP32 dims: [ {width} ] }}"
                        for name, width in tensors)
    parameters = {"family": entry.family, "dataset": entry.dataset, "sha256": entry.sha256,
                  "class_names": ",".join(entry.class_names),
                  "metrics": json.dumps(entry.metrics, separators=(",", ":")),
                  "versions": json.dumps({str(n): v for n, v in numbers.items()}, separators=(",", ":"))}
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
            f"version_policy: {{ all {{ }} }}\n"
            f"{described}\n")


def numbered(manifest: Manifest, name: str) -> dict[int, ModelEntry]:
    """Triton's version numbers for a model's versions: the one served unpinned highest."""
    served = manifest.model(name)
    ordered = [e for e in manifest.versions(name) if e.key != served.key] + [served]
    return {n: entry for n, entry in enumerate(ordered, 1)}


def write_repository(models_dir: Path, out: Path, max_batch_size: int, gpu: bool = False) -> list[str]:
    """Write every version of every manifest model into `out` (replacing what an earlier run wrote for
    them); their names."""
    manifest = load_manifest(models_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in manifest.names:
        versions = numbered(manifest, name)
        folder = out / name
        for number, entry in versions.items():
            source = models_dir / entry.file
            if not source.is_file() or sha256_of(source) != entry.sha256:
                raise RepositoryError(f"{source}: missing, or its sha256 differs from the manifest's")
            (folder / str(number)).mkdir(parents=True, exist_ok=True)
            _atomic(folder / str(number) / "model.onnx", lambda tmp, source=source: shutil.copyfile(source, tmp))
        config = config_pbtxt(manifest.model(name), max_batch_size, gpu, {n: e.version for n, e in versions.items()})
        _atomic(folder / "config.pbtxt", lambda tmp, config=config: tmp.write_text(config))
        for stale in folder.iterdir():  # numbers an earlier run wrote past this model's versions
            if stale.is_dir() and stale.name.isdigit() and int(stale.name) not in versions:
                shutil.rmtree(stale)
    return manifest.names


def _atomic(target: Path, write) -> None:
    """Write under a temporary name, then rename: Triton polling the folder never reads half a file."""
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    tmp.replace(target)
