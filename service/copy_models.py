"""`python -m service copy-models DEST`: copy a model set into a folder a running service reads.

For a models volume shared by several replicas (deploy/k8s/components/models-volume): a reader of DEST sees
the old set or the new one, never half of one. Each file the source manifest lists (every version, the
judges) is checked against its sha256, copied under a temporary name and renamed into place; the manifest
comes last, by the same rename. Files already in DEST with the right content are left as they are, and
nothing is removed (`python -m service prune` does that). A SIGHUP to each replica then serves the new set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from service.manifest import MANIFEST_NAME, JudgeEntry, ManifestError, ModelEntry, load_manifest, sha256_of


def copy_models(source: Path, dest: Path, if_empty: bool = False) -> list[str]:
    """Copy the set `source/manifest.json` lists into `dest`; the files copied (relative to `dest`).
    `if_empty`: do nothing when `dest` already has a manifest (a volume seeded once, by whichever pod is
    first). ManifestError when the source manifest or one of its files is wrong: nothing of it is published."""
    manifest = load_manifest(source)
    if if_empty and (dest / MANIFEST_NAME).exists():
        return []
    entries: list[ModelEntry | JudgeEntry] = [*manifest.models, *manifest.judges]
    listed = {entry.file: entry.sha256 for entry in entries}
    for name, sha256 in listed.items():  # all checked before anything is written
        path = source / name
        if not path.is_file() or sha256_of(path) != sha256:
            raise ManifestError(f"{path}: missing, or not the file the manifest lists (sha256 {sha256[:12]}...)")
    copied = [name for name, sha256 in listed.items() if not _holds(dest / name, sha256)]
    for name in copied:
        _place(source / name, dest / name)
    _place(source / MANIFEST_NAME, dest / MANIFEST_NAME)
    return copied


def _holds(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path) == sha256


def _place(source: Path, target: Path) -> None:
    """Copy under a hidden name beside `target`, flush it, then rename it over `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".incoming" + target.suffix,
                                         dir=target.parent)  # prune removes a leftover .onnx
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as data:
            shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # readable by the service's user whoever copies it
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
