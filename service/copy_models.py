"""`python -m service copy-models DEST`: copy a model set into a folder a running service reads.

For a models volume shared by several replicas (deploy/k8s/components/models-volume): a reader of DEST sees
the old set or the new one, never half of one. Each file the source manifest lists (every version, the
judges) is copied under a temporary name, checked against its sha256 as it is copied, and renamed into
place; the manifest comes last, the bytes that were validated, by the same rename. Files already in DEST
with the right content are left as they are; a version's file (`<name>/<version>.onnx`, named by its
content) that is there with other bytes is refused, since the manifest DEST serves may list it. Nothing is
removed (`python -m service prune` does that). A SIGHUP to each replica then serves the new set.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import partial
from pathlib import Path

from service.manifest import MANIFEST_NAME, JudgeEntry, ManifestError, ModelEntry, parse_manifest, sha256_of


def copy_models(source: Path, dest: Path, if_empty: bool = False) -> tuple[list[str], bool]:
    """Copy the set `source/manifest.json` lists into `dest`: the files copied (relative to `dest`), and
    whether the manifest was written. `if_empty`: do nothing when `dest` already has a manifest (a volume
    seeded once, by whichever pod comes first). ManifestError when the source manifest or one of its files
    is wrong, or `dest` holds a version's file with other bytes: the manifest is then not written."""
    manifest_path = source / MANIFEST_NAME
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as err:
        raise ManifestError(f"{manifest_path}: cannot read the manifest ({err.strerror})") from None
    manifest = parse_manifest(manifest_bytes.decode(), str(manifest_path))
    if if_empty and (dest / MANIFEST_NAME).exists():
        return [], False
    entries: list[ModelEntry | JudgeEntry] = [*manifest.models, *manifest.judges]
    copied = []
    for entry in entries:
        target = dest / entry.file
        if target.is_file():
            if sha256_of(target) == entry.sha256:
                continue
            if isinstance(entry, ModelEntry) and "/" in entry.file:
                raise ManifestError(f"{target}: holds other bytes than version {entry.file} (sha256 "
                                    f"{entry.sha256[:12]}...): a version's file never changes; nothing published")
        _place(partial(_copy_checked, source / entry.file, sha256=entry.sha256), target)
        copied.append(entry.file)
    _place(lambda out: out.write(manifest_bytes), dest / MANIFEST_NAME)
    return copied, True


def _copy_checked(path: Path, out, *, sha256: str) -> None:
    """Copy `path` into `out`, hashing as it goes: the bytes checked are the bytes written."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing, though the manifest lists it") from None
    if digest.hexdigest() != sha256:
        raise ManifestError(f"{path}: not the file the manifest lists (sha256 {sha256[:12]}...)")


def _place(write, target: Path) -> None:
    """write(file) under a hidden name beside `target`, flushed, renamed over `target`, the folder synced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".incoming" + target.suffix,
                                         dir=target.parent)  # prune removes a leftover .onnx
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # readable by the service's user whoever copies it
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)
