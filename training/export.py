"""Export a run's decoder/generator to ONNX, prove it matches PyTorch, score it, and list it in the manifest.

The ONNX interface every model follows (the service relies on it):
  input  z      float32 [N, latent_dim]    standard normal noise
  input  y      float32 [N, num_classes]   conditional models only: a one-hot vector or any convex blend
  output image  float32 [N, 1, 28, 28]     intensity in [0, 1], white digit on black
with N dynamic. The network is exported in eval mode, so an image never depends on the rest of its batch.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from torch import nn

import service.admission as admission
from service.manifest import (
    ENDPOINTS,
    MANIFEST_NAME,
    MODEL_NAME,
    VERSION_DIGITS,
    Manifest,
    ModelEntry,
    TrainingSummary,
    load_manifest,
    sha256_of,
)
from training import evaluate, evaluator, pictures
from training.atomic import write_text_atomic
from training.factorise import factorise_projection
from training.judge_export import with_quality
from training.loop import SNAPSHOT_ROWS, fixed_noise, load_run, read_history
from training.models.gan import Generator
from training.models.vae import VAE
from training.onnx_export import EXAMPLE_BATCH, PARITY_SAMPLES, ExportError, export_checked

PARITY_TOLERANCE = 1e-4  # max absolute pixel difference, ONNX Runtime CPU vs PyTorch
GIF_FRAMES = 20


class _Decoder(nn.Module):
    """The exported graph: `generate(z, y)` alone, named inputs, float32 out."""

    def __init__(self, net: Generator | VAE, conditional: bool):
        super().__init__()
        self.net, self.conditional = net, conditional

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.generate(z, y if self.conditional else None).float()


def _inputs(latent_dim: int, num_classes: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """z, and for conditional models y: random one-hots and, for half the rows, blends of two classes."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent_dim, generator=generator)
    if not num_classes:
        return (z,)
    eye = torch.eye(num_classes)
    a, b = (torch.randint(num_classes, (n,), generator=generator) for _ in range(2))
    weight = torch.rand(n, 1, generator=generator) * (torch.arange(n) % 2)[:, None]  # odd rows blend
    return z, (1 - weight) * eye[a] + weight * eye[b]


def export_onnx(net: Generator | VAE, num_classes: int, path: Path) -> int:
    """Write `net.generate` to `path` atomically after the parity check; returns the opset."""
    # The ignore: Module.to takes memory_format=, which the overloads in its stub omit
    decoder = _Decoder(copy.deepcopy(net).float().to("cpu", memory_format=torch.contiguous_format),  # type: ignore[call-overload]
                       num_classes > 0).eval()
    example = _inputs(net.latent_dim, num_classes, EXAMPLE_BATCH, seed=0)
    check = _inputs(net.latent_dim, num_classes, PARITY_SAMPLES, seed=1)
    return export_checked(decoder, example, ["z", "y"][:len(example)], "image", path, check, PARITY_TOLERANCE)


def _export_version(net: Generator | VAE, num_classes: int, folder: Path) -> Path:
    """The network as `folder/<version>.onnx`, the version the first 12 hex digits of the file's sha256: a
    new file beside the served ones, never written over one (the same content is the same file). Exported
    first under a name no manifest lists, then renamed to its version in one step."""
    folder.mkdir(parents=True, exist_ok=True)
    incoming = folder / ".incoming.onnx"
    try:
        export_onnx(net, num_classes, incoming)
        digest = sha256_of(incoming)
        target = folder / f"{digest[:VERSION_DIGITS]}.onnx"
        if target.is_file() and sha256_of(target) == digest:
            incoming.unlink()  # already exported: this version exists
        else:
            os.replace(incoming, target)
    finally:
        incoming.unlink(missing_ok=True)
    return target


def onnx_opset(path: Path) -> int:
    import onnx
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _training_summary(run: Path, record: dict, epoch: int, exported_as: dict | None = None) -> TrainingSummary:
    history = read_history(run / "metrics.jsonl", epoch)
    seconds = sum(row["seconds"] for row in history)
    images = sum(row["seconds"] * row["images_per_s"] for row in history)
    settings = {"train": _plain(record.get("train", {})), "model": _plain(record.get("model_config", {}))}
    return TrainingSummary(epochs=epoch, seconds=round(seconds, 1), device=record["device"],
                           images_per_s=round(images / seconds, 1) if seconds else 0.0, torch=record["torch"],
                           settings=settings | ({"export": exported_as} if exported_as else {}))


def _plain(settings: dict) -> dict:
    """A recipe's settings as JSON values (a path as its text)."""
    return {key: list(value) if isinstance(value, tuple) else value
            if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
            for key, value in settings.items()}


def _save_sample_grid(source: evaluate.Source, path: Path, seed: int) -> None:
    """10 x 10 samples from the exported file; for a conditional model each column is one class."""
    z, y = fixed_noise(source.latent_dim, source.num_classes, seed, torch.device("cpu"))
    images = source.draw(z.numpy(), None if y is None else y.numpy())
    pictures.save_grid(images, path, nrow=SNAPSHOT_ROWS)


def export_run(run: Path, name: str, out_dir: Path = Path("exported"), default_for: tuple[str, ...] = (),
               samples: int = evaluate.DEFAULT_SAMPLES, evaluator_dir: Path | None = None,
               data_dir: str | Path | None = None, raw: bool = False, log=print, serve: bool = True,
               canary: float | None = None, accept_worse: str | None = None,
               dense_rank: int | None = None, sharpen: float | None = None) -> ModelEntry:
    """Export, check, evaluate and list one run as a new version of `name`, with its figures by the judge's
    ONNX file (the judge is exported beside it when the manifest lists none of its kind); returns its
    manifest entry. `data_dir` locates the evaluator's data (default: the run's own data when it is the
    evaluator's dataset, else data/mnist); `raw` exports a GAN's raw generator rather than its EMA.

    The version becomes the one `name` serves unpinned (`serve`), or gets a `canary` share of those
    requests, or is listed for pinned requests only. It must earn its place (service/admission.py): below
    its kind's floors, or worse than the version it would replace, it is refused and the manifest is left as
    it was, unless `accept_worse` gives the reason to list it anyway (recorded in its entry; the floors still
    keep the service from serving it). Nothing the service reads changes before the manifest's one rename.
    `dense_rank` (a GAN) or `sharpen` (a VAE): the network changed first (_as_exported)."""
    _check_arguments(name, default_for, serve, canary, accept_worse, dense_rank, sharpen)
    manifest_path = out_dir / MANIFEST_NAME
    manifest = load_manifest(out_dir) if manifest_path.exists() else Manifest()
    if canary is not None and name not in manifest.names:
        raise ExportError(f"--canary {canary:g}: {name} has no served version yet to share its requests with")
    trainer, record, epoch = load_run(run)
    if raw and trainer.ema is None:
        raise ExportError(f"--raw: {run} keeps no EMA, so its only weights are the raw ones")
    net = trainer.nets["generator"] if raw else trainer.sampler()
    assert isinstance(net, (Generator, VAE))
    num_classes = trainer.num_classes
    net, exported_as = _as_exported(net, run, trainer.config.seed, dense_rank, sharpen, log)
    onnx_path = _export_version(net, num_classes, out_dir / name)
    opset = onnx_opset(onnx_path)
    log(f"{onnx_path}: parity with PyTorch within {PARITY_TOLERANCE:g} over {PARITY_SAMPLES} samples")

    config = trainer.config
    source = evaluate.onnx_source(onnx_path)
    judge = evaluator.judge_for_run(config, data_dir, evaluator_dir, log=log)
    metrics = evaluate.evaluate_run(trainer, source, judge, samples)
    log(evaluate.format_table(name, metrics))

    entry = ModelEntry(
        name=name, family=record["family"], conditional=num_classes > 0, latent_dim=net.latent_dim,
        num_classes=num_classes, class_names=record["class_names"], file=onnx_path.relative_to(out_dir).as_posix(),
        sha256=sha256_of(onnx_path), opset=opset, dataset=record["dataset"],
        training=_training_summary(run, record, epoch, exported_as), metrics=metrics, accepted_worse=accept_worse)
    replaced = manifest.model(name) if name in manifest.names else None
    try:
        updated = manifest.upsert(entry, default_for, serve=serve and canary is None, canary=canary)
    except ValueError as err:
        raise ExportError(f"{manifest_path}: {err}") from None
    updated = with_quality(updated, out_dir, judge, evaluator.KINDS[config.dataset], [name], samples, log=log,
                           also=(entry.key,))
    listed = next(m for m in updated.models if m.key == entry.key)
    judge_entry = next(j for j in updated.judges if listed.quality and j.name == listed.quality.judge)
    _admit(listed, replaced if serve and canary is None else None, len(judge_entry.class_names), accept_worse,
           onnx_path, log)
    write_text_atomic(manifest_path, updated.to_json())
    how = "serves unpinned requests" if serve and canary is None else (
        f"canary: {canary:.0%} of unpinned requests" if canary is not None else "for pinned requests only")
    log(f"{manifest_path}: {entry.key} listed, {how}" + (f", default for {', '.join(default_for)}" if default_for else ""))
    if serve and canary is None:  # the pictures show what a visitor gets
        _save_sample_grid(source, out_dir / f"{name}.png", config.seed)
        _save_progress(run, out_dir / f"{name}-progress.gif")
    return listed


def _as_exported(net: Generator | VAE, run: Path, seed: int, dense_rank: int | None, sharpen: float | None,
                 log) -> tuple[Generator | VAE, dict[str, object]]:
    """The network the file will hold (the run's, or a changed copy) and what the entry's training settings
    record of the change under `export`."""
    if dense_rank is not None:
        return _factorised(net, dense_rank, run, seed, log)
    if sharpen is not None:
        return sharpened(net, sharpen, run, log), {"sharpen": sharpen}
    return net, {}


def _factorised(net: Generator | VAE, rank: int, run: Path, seed: int, log) -> tuple[Generator, dict[str, object]]:
    """A copy of the generator with its widest dense layer factorised to `rank` (training/factorise.py), and
    what the entry's training settings record of it under `export`; the run's own network stays as trained."""
    if not isinstance(net, Generator):
        raise ExportError(f"--dense-rank: {run} is a VAE; only a GAN generator's dense layer is factorised")
    net = copy.deepcopy(net)
    try:
        kept = factorise_projection(net, rank, seed=seed)
    except ValueError as err:
        raise ExportError(str(err)) from None
    log(f"dense layer factorised to rank {rank}: {kept:.4%} of its outputs' variance kept")
    return net, {"dense_rank": rank, "variance_kept": round(kept, 6)}


def sharpened(net: Generator | VAE, temperature: float, run: Path, log) -> VAE:
    """A copy of the VAE whose drawn images are sigmoid(logits / temperature): the Bernoulli means sharpened
    toward 0 and 1 where the decoder hedges between stroke and background. The run's network, its ELBO and
    its latents stay as trained; only the exported picture of each z changes."""
    if not isinstance(net, VAE):
        raise ExportError(f"--sharpen: {run} is a GAN; only a VAE's Bernoulli logits are sharpened")
    check_sharpen(temperature)
    net = copy.deepcopy(net)
    net.output_temperature = temperature
    log(f"decoder logits divided by {temperature:g} before the sigmoid")
    return net


def check_sharpen(temperature: float) -> None:
    """The output temperature of `--sharpen`: below 1 sharpens, 1 is the mean itself, above 1 blurs."""
    if not 0 < temperature < 1:
        raise ExportError(f"--sharpen {temperature:g}: the output temperature must lie strictly between 0 and 1")


def _check_arguments(name: str, default_for: tuple[str, ...], serve: bool, canary: float | None,
                     accept_worse: str | None, dense_rank: int | None, sharpen: float | None) -> None:
    """Every argument, before minutes of export and evaluation."""
    if dense_rank is not None and sharpen is not None:
        raise ExportError("--dense-rank and --sharpen: choose one (the first is for a GAN, the second for a VAE)")
    if sharpen is not None:
        check_sharpen(sharpen)
    if not re.fullmatch(MODEL_NAME, name) or len(name) > 64:
        raise ExportError(f"--name {name!r}: a model name is 1-64 of a-z, 0-9, - and _, starting with a letter or "
                          f"digit")
    for endpoint in default_for:
        if endpoint not in ENDPOINTS:
            raise ExportError(f"--default-for {endpoint}: choose from {', '.join(ENDPOINTS)}")
    if canary is not None and not 0 < canary < 1:
        raise ExportError(f"--canary {canary:g}: a share of requests between 0 and 1, e.g. 0.1")
    if canary is not None and not serve:
        raise ExportError("--canary and --no-serve: choose one (a canary serves a share of unpinned requests)")
    if accept_worse is not None and not accept_worse.strip():
        raise ExportError("--accept-worse: give the reason, e.g. --accept-worse 'smaller and faster'")


def _admit(entry: ModelEntry, replaced: ModelEntry | None, classes: int, accept_worse: str | None, path: Path,
           log) -> None:
    """The floors and the comparison with the version it replaces (service/admission.py), on the judge's
    figures; ExportError naming each shortfall unless `accept_worse`."""
    assert entry.quality is not None
    figures = entry.quality.model_dump(include=set(admission.FIGURES), exclude_none=True)
    problems = admission.below_floors(entry, figures, classes)
    old = replaced.quality if replaced is not None and replaced.key != entry.key else None
    if old is not None and replaced is not None and old.judge_sha256 == entry.quality.judge_sha256:
        problems += admission.worse_than(figures, entry.quality.samples,
                                         old.model_dump(include=set(admission.FIGURES), exclude_none=True),
                                         old.samples, replaced.version)
    if not problems:
        return
    if accept_worse is None:
        raise ExportError(f"{entry.key} refused: " + "; ".join(problems) + ". The manifest is unchanged; "
                          f"{path} is left unlisted (python -m service prune removes it). --accept-worse REASON "
                          f"lists it anyway (the service still never serves a version below the floors).")
    log(f"{entry.key}: listed though " + "; ".join(problems) + f" (--accept-worse: {accept_worse})")


def _save_progress(run: Path, path: Path) -> None:
    """At most GIF_FRAMES evenly spaced epochs, always the last: a few hundred KB to commit."""
    snapshots = sorted((run / "snapshots").glob("epoch_*.png"))
    if snapshots:
        keep = sorted({round(i * (len(snapshots) - 1) / (GIF_FRAMES - 1)) for i in range(GIF_FRAMES)})
        pictures.save_progress_gif([snapshots[i] for i in keep], path, reduce=pictures.GRID_SCALE)
