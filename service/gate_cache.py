"""The quality gate's measurements, remembered by what determines them: the model file's sha256, the
judge file's, the seeded inputs (seed, samples), the ONNX Runtime version and the provider. Nothing else
can change what the gate measures, so a restart, a repeated SIGHUP or a storm of them measures each file
once (service/lifecycle.py).

One small JSON file per measurement, written whole under a temporary name and renamed: two services
sharing the folder never read half of one. A folder that cannot be written leaves the cache in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import onnxruntime as ort

from service.quality import Measured

log = logging.getLogger("digitgen.quality")


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "digit-gen" / "gates"


class GateCache:
    def __init__(self, folder: Path | None):
        self.folder: Path | None = folder or default_folder()
        self._memory: dict[str, Measured] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("the quality gate's cache %s cannot be created (%s); measurements are kept in memory only",
                        self.folder, err.strerror or err)
            self.folder = None

    @staticmethod
    def key(model_sha256: str, judge_sha256: str, seed: int, samples: int, provider: str) -> str:
        what = [model_sha256, judge_sha256, str(seed), str(samples), ort.__version__, provider]
        return hashlib.sha256("|".join(what).encode()).hexdigest()

    def get(self, key: str) -> Measured | None:
        if key in self._memory or self.folder is None:
            return self._memory.get(key)
        try:
            data = json.loads((self.folder / f"{key}.json").read_text())
            found = Measured(int(data["samples"]), {k: float(v) for k, v in data["figures"].items()},
                             float(data["seconds"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # a damaged entry: measure again
            log.warning("the quality gate's cache entry %s is unreadable (%s); measuring again", key[:12], err)
            return None
        self._memory[key] = found
        return found

    def put(self, key: str, measured: Measured) -> None:
        self._memory[key] = measured
        if self.folder is None:
            return
        target = self.folder / f"{key}.json"
        temporary = target.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps({"samples": measured.samples, "figures": measured.figures,
                                             "seconds": measured.seconds}))
            temporary.replace(target)
        except OSError as err:
            log.warning("the quality gate's cache %s cannot be written (%s)", self.folder, err.strerror or err)
            temporary.unlink(missing_ok=True)
