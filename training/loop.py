"""The epoch loop: batches by shuffled index, checkpoints, fixed-noise snapshots, metrics, progress.

A run directory holds everything about one run:
  config.json       the settings it was started with (and resumes with)
  metrics.jsonl     one row per epoch: each loss term, seconds, images/s
  checkpoint.pt     networks, optimizers, EMA, RNG states; written atomically every epoch
  snapshots/        epoch_0001.png, ...: the same z (and labels) every epoch
  progress.gif      those snapshots animated
  loss.png          loss curves per epoch
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training import distributed, pictures
from training.atomic import atomic_path, write_text_atomic
from training.data import DigitData, load_dataset, shuffled_batches
from training.distributed import World
from training.models import MODELS, ModelSpec
from training.trainers import TrainConfig, Trainer, lr_scale, make_trainer

SNAPSHOT_ROWS = 10  # the snapshot grid is 10 x 10; for conditional models each column is one class


class RunError(Exception):
    """A run that cannot start or resume; the message names the flag or file."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def fixed_noise(latent_dim: int, num_classes: int, seed: int, device: torch.device):
    """The snapshot inputs: the same z and labels at every epoch of a run."""
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    z = torch.randn(SNAPSHOT_ROWS * SNAPSHOT_ROWS, latent_dim, generator=generator)
    y = None
    if num_classes:
        labels = torch.arange(SNAPSHOT_ROWS * SNAPSHOT_ROWS) % num_classes
        y = torch.nn.functional.one_hot(labels, num_classes).float().to(device)
    return z.to(device), y


@dataclass
class RunResult:
    out: Path
    trainer: Trainer
    history: list[dict]


def read_history(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["epoch"] <= up_to_epoch]


def _noise_state(device: torch.device, world: World) -> dict:
    """This process's noise generators: the CPU's and, on CUDA, its device's (all devices when alone)."""
    cuda = []
    if device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)] if world.distributed else torch.cuda.get_rng_state_all()
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _save_checkpoint(path: Path, trainer: Trainer, epoch: int, step: int, data_rng: torch.Generator,
                     world: World) -> None:
    """Every rank takes part (it hands over its noise state); rank 0 writes."""
    noise = distributed.gather(world, _noise_state(trainer.device, world))
    if not world.main:
        return
    state = {
        "epoch": epoch,
        "step": step,
        "world_size": world.size,
        "trainer": trainer.state_dict(),
        "rng": {**noise[0], "data": data_rng.get_state(), "ranks": noise[1:]},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, trainer: Trainer, data_rng: torch.Generator,
                     world: World | None = None) -> tuple[int, int]:
    """The networks, optimizers and EMA; with `world` (resuming) also this rank's noise and the data order."""
    try:
        state = torch.load(path, map_location=trainer.device, weights_only=True)
        trainer.load_state_dict(state["trainer"])
    except Exception as err:  # any unreadable or mismatched checkpoint is the same user-facing problem
        raise RunError(f"{path}: cannot resume from this checkpoint ({err})") from err
    if world is None:
        return state["epoch"], state["step"]
    saved_size = state.get("world_size", 1)
    if saved_size != world.size:
        raise RunError(f"{path} was written by a run of {saved_size} process(es); resume it with "
                       f"{saved_size} (torchrun --nproc_per_node), not {world.size}: each process's data "
                       f"shard, its noise and the global batch depend on the number of processes")
    noise = state["rng"] if world.rank == 0 else state["rng"]["ranks"][world.rank - 1]
    torch.set_rng_state(noise["torch"].cpu())
    if trainer.device.type == "cuda" and noise["cuda"]:
        if world.distributed:
            torch.cuda.set_rng_state(noise["cuda"][0].cpu(), trainer.device)
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in noise["cuda"]])
    data_rng.set_state(state["rng"]["data"].cpu())
    return state["epoch"], state["step"]


def _config_record(config: TrainConfig, model_config, spec: ModelSpec, device: torch.device,
                   data: DigitData, world: World) -> dict:
    return {
        "train": dataclasses.asdict(config),
        "model_config": dataclasses.asdict(model_config),
        "family": spec.name,
        "objective": spec.objective,
        "conditional": spec.conditional,
        "dataset": data.name,
        "class_names": list(data.class_names),
        "device": str(device),
        "processes": world.size,  # the global batch is processes x train.batch_size
        "torch": torch.__version__,
    }


def _format_terms(terms: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in terms.items())


@dataclass
class _RunState:
    """What one call of `train` carries from epoch to epoch."""
    out: Path
    spec: ModelSpec
    config: TrainConfig
    trainer: Trainer
    data: DigitData
    data_rng: torch.Generator     # the order of each epoch's batches, the same on every rank
    world: World
    start_epoch: int              # the last finished epoch: 0, or the checkpoint's when resuming
    step: int                     # batches trained so far, over every epoch
    history: list[dict]           # the rows of metrics.jsonl
    z_fixed: torch.Tensor         # [100, latent_dim]: the snapshot noise
    y_fixed: torch.Tensor | None  # [100, classes]: the snapshot labels of a conditional model

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"


def train(config: TrainConfig, model_config, out: Path, resume: bool = False, progress: bool = True,
          data: DigitData | None = None, log=print, world: World | None = None) -> RunResult:
    """Train `config.model` into `out`, continuing from `out/checkpoint.pt` when `resume` is set.

    Under torchrun (`world`: from the environment when not given) every rank runs this with the same
    arguments; rank 0 alone writes `out`, logs and shows progress.
    """
    world = world or distributed.from_environment()
    log = log if world.main else (lambda *_: None)
    run = _start(config, model_config, out, resume, data, world, log)
    for epoch in range(run.start_epoch + 1, config.epochs + 1):
        row = _train_epoch(run, epoch, progress)
        run.history.append(row)
        if world.main:
            _write_epoch_outputs(run, epoch)
        # Last: it vouches for the files. Every rank takes part: the ranks' one meeting point per epoch.
        _save_checkpoint(run.checkpoint, run.trainer, epoch, run.step, run.data_rng, world)
        terms = {k: v for k, v in row.items() if k not in ("epoch", "step", "seconds", "images_per_s")}
        log(f"{run.spec.name} epoch {epoch}/{config.epochs}  {_format_terms(terms)}  "
            f"{row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s")
    distributed.barrier(world)  # every rank returns once rank 0's last checkpoint is on disk
    return RunResult(out, run.trainer, run.history)


def _start(config: TrainConfig, model_config, out: Path, resume: bool, data: DigitData | None, world: World,
           log) -> _RunState:
    """Set up a run: the device, the data on it, the trainer (from the checkpoint when resuming), and
    config.json; nothing trains yet."""
    spec = MODELS[config.model]
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    device = distributed.join(world, resolve_device(config.device))
    torch.manual_seed(config.seed)  # the same initial networks on every rank
    data_rng = torch.Generator().manual_seed(config.seed)  # the same permutations on every rank
    if data is None:
        data = distributed.local_first(world, lambda: load_dataset(config.dataset, config.data_dir,
                                                                   limit=config.limit))
    if config.batch_size * world.size > len(data.train):
        raise RunError(f"--batch-size {config.batch_size}: {world.size} x {config.batch_size} is more than the "
                       f"{len(data.train)} training images")
    data = data.to(device)  # the whole dataset lives on the training device

    trainer = make_trainer(spec, model_config, config, data.num_classes, device)
    if world.distributed:
        torch.manual_seed(distributed.noise_seed(config.seed, world))
    start_epoch, step = 0, 0
    if resume and checkpoint.exists():
        start_epoch, step = _load_checkpoint(checkpoint, trainer, data_rng, world)
        log(f"resuming {out} after epoch {start_epoch} (step {step})")
    starts = distributed.gather(world, start_epoch)
    if len(set(starts)) > 1:
        raise RunError(f"the ranks found different checkpoints in {out} (epochs {starts}): every process "
                       f"must see the same run folder; on several machines put --out on a shared filesystem")
    trainer.distribute(world)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(
            _config_record(config, model_config, spec, device, data, world), indent=2))
    z_fixed, y_fixed = fixed_noise(trainer.sampler().latent_dim, trainer.num_classes, config.seed, device)
    return _RunState(out, spec, config, trainer, data, data_rng, world, start_epoch, step,
                     read_history(out / "metrics.jsonl", start_epoch), z_fixed, y_fixed)


def _train_epoch(run: _RunState, epoch: int, progress: bool) -> dict:
    """One pass over this rank's shard of the training digits; the epoch's row of metrics.jsonl
    (each loss term averaged over the batches and the ranks, validation, seconds, images/s)."""
    config, trainer, data, world = run.config, run.trainer, run.data, run.world
    trainer.train()
    trainer.set_lr_scale(lr_scale(epoch, config.epochs, config.lr_decay_start))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    batches = shuffled_batches(len(data.train), config.batch_size, run.data_rng, trainer.device, world.rank,
                               world.size)
    bar = tqdm(batches, desc=f"{run.spec.name} epoch {epoch}/{config.epochs}", unit="batch",
               disable=None if progress and world.main else True, leave=False, dynamic_ncols=True)
    started = time.perf_counter()
    for index, batch in enumerate(bar):
        terms = trainer.step(data.train.images[batch], data.train.labels[batch], index)
        run.step += 1
        for key, value in terms.items():
            sums[key] = sums.get(key, 0) + value
            counts[key] = counts.get(key, 0) + 1
        if progress and index % 10 == 0:
            rate = (index + 1) * config.batch_size * world.size / (time.perf_counter() - started)
            bar.set_postfix({k: f"{float(v):.3f}" for k, v in terms.items()} | {"img/s": f"{rate:.0f}"})
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row: dict[str, float] = {"epoch": epoch, "step": run.step}
    row.update(distributed.mean_over_ranks(world, {key: float(sums[key]) / counts[key] for key in sums},
                                           trainer.device))
    if hasattr(trainer, "validate") and world.main:
        row.update(trainer.validate(data.val.images, data.val.labels))
    row.update({"seconds": round(seconds, 3),
                "images_per_s": round(len(batches) * config.batch_size * world.size / seconds, 1)})
    return row


def _write_epoch_outputs(run: _RunState, epoch: int) -> None:
    """Rank 0's files of a finished epoch: its snapshot, the progress GIF, the loss curves, metrics.jsonl."""
    sampler = run.trainer.sampler()
    was_training = sampler.training
    sampler.eval()
    with torch.no_grad():
        images = sampler.generate(run.z_fixed, run.y_fixed).float().cpu().numpy()
    sampler.train(was_training)
    snapshots = run.out / "snapshots"
    pictures.save_grid(images, snapshots / f"epoch_{epoch:04d}.png", nrow=SNAPSHOT_ROWS)
    pictures.save_progress_gif(sorted(snapshots.glob("epoch_*.png")), run.out / "progress.gif")
    pictures.save_loss_curves(run.history, run.out / "loss.png", f"{run.spec.name} on {run.data.name}")
    write_text_atomic(run.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run.history))


def saved_settings(record: dict) -> tuple[TrainConfig, dict[str, str]]:
    """A run's config.json back as its TrainConfig and its model settings as `--set` strings."""
    train_saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record["train"].items()}
    overrides = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v)
                 for k, v in record["model_config"].items()}
    return TrainConfig(**train_saved), overrides


def load_run(out: Path, device: str = "cpu") -> tuple[Trainer, dict, int]:
    """A finished or interrupted run, ready to sample: (trainer with its last checkpoint, config.json, epoch)."""
    from training.models import model_config as build_model_config

    out = Path(out)
    try:
        record = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{out}: not a run directory (config.json: {err})") from None
    if not (out / "checkpoint.pt").exists():
        raise RunError(f"{out}: no checkpoint.pt (has the run finished an epoch?)")
    config, overrides = saved_settings(record)
    config = dataclasses.replace(config, device=device)
    spec = MODELS[config.model]
    trainer = make_trainer(spec, build_model_config(spec, overrides), config, len(record["class_names"]),
                           resolve_device(device))
    epoch, _ = _load_checkpoint(out / "checkpoint.pt", trainer, torch.Generator())
    trainer.train(False)
    return trainer, record, epoch
