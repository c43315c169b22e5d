"""`python -m service batch OUT`: thousands of samples into a folder of PNGs (or one .npz), from a running
service (`--url`) or straight from the ONNX files of a models folder, seeded and resumable.

The images are drawn in chunks of CHUNK: chunk k asks for min(CHUNK, what is left) images with seed
`--seed + k`, exactly as `/sample` or `/generate?digit=` would with that seed and n, so the same command
gives the same images from the files as from a service serving them (the PNG bytes too). Image i is
`OUT/<i:06d>.png`, or `<i:06d>-<digit>.png` for a conditional model. Each chunk's files are written last
first, so a chunk whose first file exists is whole and is skipped: an interrupted run, run again,
continues. OUT/.batch.json records the settings that decide the images; the same OUT with other settings
is refused rather than mixed. For `.npz`, each chunk is kept under `OUT.parts/` until
all are drawn, then they are joined into OUT (images uint8 [n, 28, 28], `digits` for a conditional model,
the model and version) in one rename.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CHUNK = 64  # images per request or model call: the service's default DIGITGEN_MAX_N


@dataclass(frozen=True)
class Chunk:
    pngs: list[bytes]
    digits: list[int] | None
    model: str
    version: str


Draw = Callable[[int, int], Chunk]  # (seed, n) -> the chunk


def from_files(models_dir: Path, model: str | None, version: str | None, digit: int | None,
               truncation: float) -> Draw:
    """Draws from the models folder's ONNX file, as the service would (its latents, classes, clipping and
    PNG encoder). ValueError naming the flag when the model, version or digit does not fit."""
    from service import imaging, sampling
    from service.config import Settings
    from service.manifest import load_manifest
    from service.modelset import Loader

    manifest = load_manifest(models_dir)
    name = model or getattr(manifest.defaults, "generate" if digit is not None else "sample") or manifest.names[0]
    if name not in manifest.names:
        raise ValueError(f"--model {name}: not in {models_dir}/manifest.json; there: {', '.join(manifest.names)}")
    entry = manifest.model(name)
    if version is not None:
        entry = next((e for e in manifest.versions(name) if e.version == version), None)  # type: ignore[assignment]
        if entry is None:
            raise ValueError(f"--version {version}: {name} has "
                             f"{', '.join(e.version for e in manifest.versions(name))}")
    if digit is not None and not entry.conditional:
        raise ValueError(f"--digit {digit}: {name} is not conditional")
    if digit is not None and not 0 <= digit < entry.num_classes:
        raise ValueError(f"--digit {digit}: {name} draws 0-{entry.num_classes - 1}")
    runtime = Loader.of(Settings(models_dir=models_dir, providers="cpu", workers=1)).open(entry)

    def draw(seed: int, n: int) -> Chunk:
        z = sampling.latents(seed, n, entry.latent_dim, truncation)
        classes = None
        if entry.conditional:
            classes = [digit] * n if digit is not None else sampling.random_classes(seed, n, entry.num_classes).tolist()
        y = None if classes is None else sampling.one_hot(classes, entry.num_classes)
        pixels = imaging.to_uint8(runtime.run(z, y))
        return Chunk([imaging.png_bytes(p) for p in pixels], classes, entry.name, entry.version)
    return draw


def from_service(client, model: str | None, version: str | None, digit: int | None, truncation: float) -> Draw:
    """Draws from a running service through service/client.py (retries on 503 included)."""
    def draw(seed: int, n: int) -> Chunk:
        if digit is not None:
            got = client.generate(digit, n=n, seed=seed, model=model, version=version, truncation=truncation)
        else:
            got = client.sample(n=n, seed=seed, model=model, version=version, truncation=truncation)
        return Chunk(got.pngs, got.digits, got.model, got.version)
    return draw


def run(out: Path, n: int, seed: int, draw: Draw, progress=sys.stderr, flags: dict | None = None) -> int:
    """Draw n images into `out` (a folder, or a file ending .npz), skipping chunks already there; the
    number of images drawn now. `flags`: what else decides the images (model, version, digit, truncation,
    where from), kept in `.batch.json` beside the chunks: a run resumed with other flags is refused (its
    chunks would not be the ones the command describes)."""
    npz = out.suffix == ".npz"
    folder = out.with_name(out.name + ".parts") if npz else out
    folder.mkdir(parents=True, exist_ok=True)
    _same_run(folder, {"n": n, "seed": seed, "chunk": CHUNK} | (flags or {}))
    present = {p.name for p in folder.iterdir()}
    started, drawn = time.monotonic(), 0
    for k, first in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - first)
        if _done(present, first, size, npz, k):
            continue
        chunk = draw(seed + k, size)
        _write(folder, first, chunk, npz, k)
        drawn += size
        rate = drawn / max(time.monotonic() - started, 1e-6)
        print(f"\r{first + size}/{n} images ({rate:.0f}/s)", end="", file=progress, flush=True)
    print(file=progress)
    if npz:
        _join(folder, out, n)
    return drawn


def _same_run(folder: Path, wanted: dict) -> None:
    record = folder / ".batch.json"
    if record.exists():
        found = json.loads(record.read_text())
        differ = [f"{key} {found.get(key)!r} (now {value!r})" for key, value in wanted.items() if found.get(key) != value]
        if differ:
            raise ValueError(f"{folder} holds a run drawn with other settings: " + ", ".join(differ)
                             + "; give another OUT, or the same settings to resume it")
    else:
        _atomic(record, json.dumps(wanted).encode())


def _name(i: int, digit: int | None) -> str:
    return f"{i:06d}.png" if digit is None else f"{i:06d}-{digit}.png"


def _done(present: set[str], first: int, size: int, npz: bool, k: int) -> bool:
    if npz:
        return f"chunk-{k:06d}.npz" in present
    return f"{first:06d}.png" in present or any(re.fullmatch(rf"{first:06d}-\d+\.png", name) for name in present)


def _write(folder: Path, first: int, chunk: Chunk, npz: bool, k: int) -> None:
    """The chunk's files, each written under a temporary name and renamed: a file there is a whole one."""
    if npz:
        from PIL import Image
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in chunk.pngs])
        buffer = io.BytesIO()
        np.savez(buffer, images=pixels, digits=np.asarray(chunk.digits if chunk.digits is not None else [], np.int64),
                 model=chunk.model, version=chunk.version)
        _atomic(folder / f"chunk-{k:06d}.npz", buffer.getvalue())
        return
    for i in reversed(range(len(chunk.pngs))):  # the chunk's first file last: once it is there, all are
        _atomic(folder / _name(first + i, None if chunk.digits is None else chunk.digits[i]), chunk.pngs[i])


def _join(folder: Path, out: Path, n: int) -> None:
    parts = sorted(folder.glob("chunk-*.npz"))
    images, digits = [], []
    for part in parts:  # each closed once read: thousands of chunks must not hold thousands of files
        with np.load(part) as data:
            images.append(data["images"])
            digits.append(data["digits"])
            model, version = str(data["model"]), str(data["version"])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.concatenate(images), digits=np.concatenate(digits), model=model,
                        version=version)
    if sum(len(i) for i in images) != n:
        raise ValueError(f"{folder}: its chunks hold {sum(len(i) for i in images)} images, not {n}")
    _atomic(out, buffer.getvalue())
    shutil.rmtree(folder)


def _atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
