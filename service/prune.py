"""`python -m service prune`: remove the model files no manifest entry references any more.

Export never writes over a file (each version is a new file named by its content) and never deletes one: a
running service, a rollback or a pinned client may still need it. Files are removed only by this command,
which an operator runs once the versions are no longer wanted: it reads the manifest, keeps every file it
lists (every version of every model, the judges), and removes the other `<name>/<version>.onnx` files and
the leftovers of an interrupted export (`.incoming.onnx`). A manifest that does not validate removes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.manifest import MODEL_NAME, load_manifest


def unreferenced(models_dir: Path) -> list[Path]:
    """The model files under `models_dir/<name>/` that the manifest does not list (ManifestError when it
    cannot be read)."""
    manifest = load_manifest(models_dir)
    listed = {(models_dir / entry.file).resolve() for entry in manifest.models}
    found = []
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir() and re.fullmatch(MODEL_NAME, p.name)):
        for path in sorted(folder.glob("*.onnx")):  # the hidden .incoming.onnx too
            if path.is_file() and path.resolve() not in listed:
                found.append(path)
    return found


def prune(models_dir: Path, dry_run: bool = False) -> tuple[list[Path], int]:
    """Remove (or, `dry_run`, only list) the unreferenced files; them, and the bytes they held."""
    paths = unreferenced(models_dir)
    size = sum(p.stat().st_size for p in paths)
    if not dry_run:
        for path in paths:
            path.unlink()
            if not any(path.parent.iterdir()):
                path.parent.rmdir()
    return paths, size
