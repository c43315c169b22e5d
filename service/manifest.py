"""The manifest: the one contract between training (which writes it) and the service (which reads it).

`exported/manifest.json` lists every exported decoder/generator with its ONNX interface, checksum,
training summary and evaluation metrics, and names the default model of each endpoint; optionally the
judges (the calibrated evaluators as ONNX files) and, per model, the figures its judge recorded, which
the service's quality gate checks. Pure pydantic: the service imports it without torch.

Versions (schema 2): a model name may list several versions, each an immutable file named by its content
(`<name>/<version>.onnx`, the version the first 12 hex digits of its sha256); `rollouts` names the
version each model serves when a request does not pin one. A schema 1 manifest (one file per name, no
versions) reads as before: each entry's version is derived from its sha256.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

SCHEMA_VERSION = 2
VERSION_DIGITS = 12  # of the sha256: a version names the file's content
MODEL_NAME = r"[a-z0-9][a-z0-9_-]*"  # what a model's name may be (and at most 64 characters)
MANIFEST_NAME = "manifest.json"
ENDPOINTS = ("sample", "generate", "interpolate")


class ManifestError(ValueError):
    """A manifest that is missing, not JSON or not valid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainingSummary(_Strict):
    epochs: int = Field(ge=1)
    seconds: float = Field(ge=0, description="wall time of all epochs")
    device: str
    images_per_s: float = Field(ge=0, description="mean training throughput")
    torch: str
    settings: dict[str, dict[str, object]] | None = Field(
        None, description="every setting of the run that made it: `train` (the recipe's flags: dataset, epochs, "
                          "batch size, learning rates, seed...) and `model` (the network's sizes); absent for "
                          "files exported before it was recorded")

    @model_serializer(mode="wrap")
    def _without_settings(self, write) -> dict:
        data = write(self)
        if self.settings is None:
            data.pop("settings", None)
        return data


class QualityFigures(_Strict):
    """A model's figures as its judge's ONNX file measured them, on the first `samples` draws of `seed`:
    z = numpy default_rng(seed).standard_normal((samples, latent_dim), float32) and, for conditional
    models, the classes 0, 1, ..., 9, 0, ... one-hot. The gate draws a prefix of the same inputs."""
    judge: str = Field(description="the name of the judge (in `judges`) that measured them")
    judge_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="that judge's file when it measured them")
    samples: int = Field(ge=1)
    seed: int = Field(ge=0)
    confidence: float = Field(ge=0, le=1, description="share of samples whose top probability exceeds the "
                                                       "judge's `confident`")
    min_class_share: float = Field(ge=0, le=1, description="share of the least often predicted class")
    conditional_accuracy: float | None = Field(None, ge=0, le=1, description="share read as the class asked "
                                                                            "for (conditional models)")


class JudgeEntry(_Strict):
    """A calibrated classifier of one kind of data, exported with its temperature folded in:
    input `image` float32 [N, 1, 28, 28] in [0, 1], output `probabilities` float32 [N, classes]."""
    name: str = Field(pattern=rf"^{MODEL_NAME}$", max_length=64)
    kind: str = Field(description="the kind of data it judges: digits, fashion")
    datasets: list[str] = Field(description="the datasets whose models it judges")
    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$", description="ONNX file beside the manifest")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=1)
    class_names: list[str]
    image_shape: tuple[int, int, int] = (1, 28, 28)
    confident: float = Field(0.9, gt=0, lt=1, description="a sample is confident when its top probability "
                                                          "exceeds this")
    report: dict[str, float | int | str] = Field(default_factory=dict, description="how it was trained and "
                                                                                  "its test accuracy and ECE")


class ModelEntry(_Strict):
    name: str = Field(pattern=rf"^{MODEL_NAME}$", max_length=64)
    family: str = Field(description="the training family: vae, vae-dense, cvae, gan, cgan, wgan, wgan-clip")
    conditional: bool
    latent_dim: int = Field(ge=1)
    num_classes: int = Field(ge=0, description="length of the y input; 0 for unconditional models")
    class_names: list[str] = Field(description="what each index of y means; the dataset's classes")
    image_shape: tuple[int, int, int] = (1, 28, 28)
    file: str = Field(pattern=r"^([A-Za-z0-9_-][A-Za-z0-9_.-]*/)?[A-Za-z0-9_-][A-Za-z0-9_.-]*\.onnx$",
                      description="ONNX file under the manifest's folder: <name>/<version>.onnx (or, before versions, "
                                  "<name>.onnx)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=1)
    dataset: str
    training: TrainingSummary
    metrics: dict[str, float | list[float] | None] = Field(
        default_factory=dict, description="the evaluator's figures (training/evaluate.py)")
    quality: QualityFigures | None = Field(
        None, description="what the judge's ONNX file measured of this file; the quality gate compares with it")
    accepted_worse: str | None = Field(
        None, min_length=1, max_length=500,
        description="why this version may replace a better one (`export --accept-worse REASON`); without it, a "
                    "version that scores worse than the one it would replace is refused, at export and at the gate")

    @model_serializer(mode="wrap")
    def _without_quality(self, write) -> dict:
        """No `quality` (or `accepted_worse`) key for a model without one, as before they existed; the version
        written beside the sha256 it comes from, for readers of the file."""
        data = write(self)
        for optional in ("quality", "accepted_worse"):
            if getattr(self, optional) is None:
                data.pop(optional, None)
        data["version"] = self.version
        return data

    @model_validator(mode="before")
    @classmethod
    def _version_is_the_content(cls, data):
        """A written `version` must be its sha256's (a hand edit that disagrees is refused); it is not kept:
        `version` is always derived, so no copy with another sha256 can carry a stale one."""
        if isinstance(data, dict) and "version" in data:
            data = dict(data)
            version, sha256 = data.pop("version"), str(data.get("sha256", ""))
            if re.fullmatch(r"[0-9a-f]{64}", sha256) and version != sha256[:VERSION_DIGITS]:  # else sha256 is named
                raise ValueError(f"version {version} is not its file's: sha256 {sha256[:VERSION_DIGITS]}...")
        return data

    @property
    def version(self) -> str:
        """The first 12 hex digits of the file's sha256: a version names the file's content."""
        return self.sha256[:VERSION_DIGITS]

    @property
    def key(self) -> str:
        """name@version: one version of one model, as the service's queues and logs name it."""
        return f"{self.name}@{self.version}"

    @model_validator(mode="after")
    def _classes_agree(self) -> ModelEntry:
        if self.conditional != (self.num_classes > 0):
            raise ValueError("conditional models need num_classes > 0, unconditional ones num_classes = 0")
        if self.conditional and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        return self


class Defaults(_Strict):
    sample: str | None = None
    generate: str | None = None
    interpolate: str | None = None


class Canary(_Strict):
    """A second version that gets a share of a model's unpinned requests, to compare with the default."""
    version: str = Field(pattern=r"^[0-9a-f]{12}$")
    share: float = Field(gt=0, lt=1, description="the probability that an unpinned request goes to it")


class Rollout(_Strict):
    """Which version of a model serves the requests that do not pin one (and, with a canary, which share
    of them goes to a second version)."""
    default: str = Field(pattern=r"^[0-9a-f]{12}$")
    canary: Canary | None = None

    @model_serializer(mode="wrap")
    def _without_canary(self, write) -> dict:
        data = write(self)
        if self.canary is None:
            data.pop("canary", None)
        return data


class Manifest(_Strict):
    schema_version: Literal[1, 2] = 2  # SCHEMA_VERSION
    models: list[ModelEntry] = Field(default_factory=list, description="every version of every model")
    rollouts: dict[str, Rollout] = Field(default_factory=dict, description="per model name with several versions: "
                                                                           "the one unpinned requests get")
    defaults: Defaults = Field(default_factory=Defaults)
    judges: list[JudgeEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _judges_resolve(self) -> Manifest:
        """Each model's figures name a listed judge, and that judge's current file."""
        judges = {j.name: j for j in self.judges}
        if len(judges) != len(self.judges):
            raise ValueError("judge names must be unique")
        for m in self.models:
            if m.quality is None:
                continue
            judge = judges.get(m.quality.judge)
            if judge is None:
                raise ValueError(f"{m.name}: quality.judge names {m.quality.judge!r}, which is not among the judges")
            if judge.sha256 != m.quality.judge_sha256:
                raise ValueError(f"{m.name}: quality was measured with another file of judge {judge.name} "
                                 f"({m.quality.judge_sha256[:12]}..., now {judge.sha256[:12]}...); measure it again")
        return self

    @model_validator(mode="after")
    def _names_resolve(self) -> Manifest:
        keys = [m.key for m in self.models]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"each version of a model is listed once; repeated: {', '.join(duplicates)}")
        names = [m.name for m in self.models]
        if self.schema_version == 1 and len(set(names)) != len(names):
            raise ValueError("model names must be unique (schema_version 2 lists several versions of a name)")
        for name, rollout in self.rollouts.items():
            if f"{name}@{rollout.default}" not in keys:
                raise ValueError(f"rollouts.{name}.default names version {rollout.default}, which is not among "
                                 f"{name}'s versions")
            canary = rollout.canary
            if canary is not None and (canary.version == rollout.default or f"{name}@{canary.version}" not in keys):
                raise ValueError(f"rollouts.{name}.canary.version names version {canary.version}, which is not "
                                 f"another of {name}'s versions")
        several = sorted({n for n in names if names.count(n) > 1} - set(self.rollouts))
        if several:
            raise ValueError(f"{', '.join(several)}: several versions and no rollouts entry naming the default")
        for endpoint in ENDPOINTS:
            name = getattr(self.defaults, endpoint)
            if name is None:
                continue
            if name not in names:
                raise ValueError(f"defaults.{endpoint} names {name!r}, which is not among the models")
            if endpoint == "generate" and not self.model(name).conditional:
                raise ValueError(f"defaults.generate names {name!r}, which is not conditional")
        return self

    def model(self, name: str) -> ModelEntry:
        """The version of `name` unpinned requests get."""
        rollout = self.rollouts.get(name)
        for entry in self.models:
            if entry.name == name and (rollout is None or entry.version == rollout.default):
                return entry
        raise KeyError(name)

    def canary(self, name: str) -> tuple[ModelEntry, float] | None:
        """The version that gets a share of `name`'s unpinned requests, and that share; None without one."""
        rollout = self.rollouts.get(name)
        if rollout is None or rollout.canary is None:
            return None
        version = rollout.canary.version
        return next(e for e in self.models if e.name == name and e.version == version), rollout.canary.share

    def versions(self, name: str) -> list[ModelEntry]:
        return [entry for entry in self.models if entry.name == name]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(entry.name for entry in self.models))

    def judge_for(self, entry: ModelEntry) -> JudgeEntry | None:
        """The judge of the model's data: the one its figures name, else the one listing its dataset."""
        name = entry.quality.judge if entry.quality else None
        return next((j for j in self.judges if j.name == name or (name is None and entry.dataset in j.datasets)),
                    None)

    def upsert(self, entry: ModelEntry, default_for: tuple[str, ...] = (), serve: bool = True,
               canary: float | None = None) -> Manifest:
        """A copy with `entry` added as a version of its model (the same version replaced), the endpoint
        defaults updated; `serve`: it becomes the version unpinned requests get (else the current one stays,
        and with `canary` the new one gets that share of its unpinned requests)."""
        models = [m for m in self.models if m.key != entry.key] + [entry]
        defaults = self.defaults.model_copy(update={e: entry.name for e in default_for})
        rollouts = dict(self.rollouts)
        if serve and canary is None or entry.name not in self.names:
            rollouts[entry.name] = Rollout(default=entry.version)
        else:  # the version served until now stays, named now that there are two
            current = self.model(entry.name).version
            kept = rollouts.get(entry.name)
            rollouts[entry.name] = Rollout(default=current, canary=Canary(version=entry.version, share=canary)
                                           if canary is not None else kept.canary if kept else None)
        return self._with(models, defaults, self.judges, rollouts)

    def upsert_judge(self, judge: JudgeEntry, models: list[ModelEntry]) -> Manifest:
        """A copy with `judge` replacing the judge of the same name (or appended), and `models` replacing
        theirs: the models it judges, measured again with its new file."""
        judges = [j for j in self.judges if j.name != judge.name] + [judge]
        changed = {m.key: m for m in models}
        return self._with([changed.get(m.key, m) for m in self.models], self.defaults, judges)

    def _with(self, models: list[ModelEntry], defaults: Defaults, judges: list[JudgeEntry],
              rollouts: dict[str, Rollout] | None = None) -> Manifest:
        rollouts = self.rollouts if rollouts is None else rollouts
        data: dict = {"schema_version": SCHEMA_VERSION,
                      "models": [m.model_dump() for m in sorted(models, key=lambda m: m.name)],
                      "defaults": defaults.model_dump()}
        if rollouts:
            data["rollouts"] = {name: r.model_dump() for name, r in sorted(rollouts.items())}
        if judges:
            data["judges"] = [j.model_dump() for j in sorted(judges, key=lambda j: j.name)]
        return Manifest.model_validate(data)

    @model_serializer(mode="wrap")
    def _without_judges(self, write) -> dict:
        """No `judges` (or `rollouts`) key when there are none: a manifest from before them writes back as it was."""
        data = write(self)
        if not self.judges:
            data.pop("judges", None)
        if not self.rollouts:
            data.pop("rollouts", None)
        return data

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def _describe(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        parts.append(f"{where}: {problem['msg']}")
    return "; ".join(parts)


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> Manifest:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{source}: not valid JSON ({err})") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(f"{source}: {_describe(err)}") from None


def load_manifest(models_dir: Path) -> Manifest:
    """Read and validate `models_dir/manifest.json`; raises ManifestError naming the field at fault."""
    path = Path(models_dir) / MANIFEST_NAME
    try:
        text = path.read_text()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read the manifest ({err.strerror})") from None
    return parse_manifest(text, str(path))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
