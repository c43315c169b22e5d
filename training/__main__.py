"""Command line: `python -m training list | train MODEL | evaluate RUN_OR_ONNX | evaluator | export RUN --name NAME |
truncation | judge | bundle` (training/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from training.data import DATASETS, DataError
from training.evaluate import DEFAULT_SAMPLES
from training.models import MODELS, ConfigError
from training.train_command import add_train_arguments, positive_int, run_train, truncation_value
from training.trainers import train_config


def _version() -> str:
    try:
        return metadata.version("digit-gen")
    except metadata.PackageNotFoundError:  # the source tree run without an install
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--version", action="version", version=f"digit-gen {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the trainable models and the datasets")
    add_train_command(commands)
    add_evaluate_command(commands)
    add_evaluator_command(commands)
    add_judge_command(commands)
    add_truncation_command(commands)
    add_export_command(commands)
    add_bundle_command(commands)
    return parser


def add_train_command(commands) -> None:
    """`python -m training train`: one model, by the flags of training/train_command.py."""
    train = commands.add_parser(
        "train", help="train one model",
        description="Train one model. Defaults not shown come from the model's own settings "
                    "(see `python -m training list`). Runs unchanged under torchrun (training/README.md: "
                    "several processes); --batch-size is then per process.")
    add_train_arguments(train)


def add_evaluate_command(commands) -> None:
    """`python -m training evaluate`: a run or an .onnx file scored by the calibrated judge."""
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
    evaluate.add_argument("--sharpen", type=float, metavar="T", help="a VAE: score sigmoid(logits / T), 0 < T < 1, "
                          "as `export --sharpen T` would draw")
    evaluate.add_argument("--out", type=Path, help="where to write the metrics (default RUN/metrics.json, "
                                                   "or NAME.metrics.json beside an .onnx file)")


def add_evaluator_command(commands) -> None:
    """`python -m training evaluator`: train (once) and describe the evaluator of a kind of data."""
    evaluator = commands.add_parser(
        "evaluator", help="train (once) and describe the evaluator of a kind of data",
        description="Print the cached evaluator's test accuracy and calibration, training it first when "
                    "it is not cached (about 4 minutes on a 2-core CPU for the digits).")
    evaluator.add_argument("--dataset", choices=DATASETS, default="mnist",
                           help="any dataset of the kind (default mnist: the digits evaluator)")
    evaluator.add_argument("--data-dir", help="folder of the evaluator's IDX files (default data/mnist)")


def add_truncation_command(commands) -> None:
    """`python -m training truncation`: every model of a manifest at several truncations."""
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


def add_export_command(commands) -> None:
    """`python -m training export`: a run to ONNX, listed in the manifest."""
    export = commands.add_parser(
        "export", help="export a run's decoder/generator to ONNX and list it in the manifest",
        description="Write OUT_DIR/NAME/VERSION.onnx, a new file named by its content (checked against PyTorch "
                    "under ONNX Runtime), evaluate it, hold it to the floors and to the version it replaces, and "
                    "list it in OUT_DIR/manifest.json (one atomic rename); then save its sample grid and progress "
                    "GIF beside it. A running service picks it up at its next SIGHUP.")
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
    export.add_argument("--canary", type=float, metavar="SHARE", help="send this share (0-1) of the model's unpinned "
                                                                      "requests to the new version; the served one "
                                                                      "keeps the rest")
    export.add_argument("--no-serve", action="store_true", help="list the new version for pinned requests "
                                                                "(?version=) only")
    export.add_argument("--dense-rank", type=positive_int, metavar="R", help="a GAN generator: factorise its widest "
                        "dense layer to rank R over the principal directions of its outputs (training/factorise.py): "
                        "fewer weights to read per image; the judge scores the factorised file")
    export.add_argument("--sharpen", type=float, metavar="T", help="a VAE: draw sigmoid(logits / T), 0 < T < 1, "
                        "rather than the Bernoulli mean sigmoid(logits): sharper stroke edges; the judge scores "
                        "the sharpened file")
    export.add_argument("--accept-worse", metavar="REASON", help="list the version even though it scores worse "
                                                                 "than the one it replaces (or below the floors, "
                                                                 "which the service still refuses); REASON is "
                                                                 "recorded in its entry")


def add_bundle_command(commands) -> None:
    """`python -m training bundle`: the bundled model set, trained, exported and evaluated."""
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


def add_judge_command(commands) -> None:
    """`python -m training judge`: the judge file beside the models, and their figures by it."""
    judge = commands.add_parser(
        "judge", help="export a kind's evaluator to ONNX beside the models and measure them with it",
        description="Write MODELS_DIR/judge-KIND.onnx (the evaluator with its temperature folded in, checked "
                    "against PyTorch under ONNX Runtime), list it in MODELS_DIR/manifest.json and record, for "
                    "every model it judges, the figures the service's quality gate checks (confidence, smallest "
                    "class share, conditional accuracy), measured with that file. `export` does this for its "
                    "model, exporting the judge when none is listed.")
    judge.add_argument("--models-dir", type=Path, default=Path("exported"), help="default exported/")
    judge.add_argument("--dataset", choices=DATASETS, default="mnist",
                       help="any dataset of the kind (default mnist: the digits judge)")
    judge.add_argument("--data-dir", help="folder of the evaluator's IDX files (default data/mnist)")
    judge.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES,
                       help=f"images per model (default {DEFAULT_SAMPLES})")


def cmd_list() -> None:
    width = max(map(len, MODELS))
    print("models:")
    for spec in MODELS.values():
        d = train_config(spec.name)
        print(f"  {spec.name:<{width}}  {spec.description}\n  {'':<{width}}  "
              f"batch {d.batch_size}, lr {d.lr:g} ({d.optimizer}), critic steps {d.n_critic}, EMA {d.ema_decay:g}")
    print("datasets:\n  " + "\n  ".join(DATASETS))


def cmd_train(args: argparse.Namespace) -> None:
    from training.distributed import from_environment

    result = run_train(args)
    if from_environment().main:
        print(f"done: {result.out} ({len(result.history)} epochs; snapshots in {result.out / 'snapshots'}, "
              f"animation {result.out / 'progress.gif'})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training import evaluate, evaluator
    from training.export import check_sharpen, sharpened
    from training.loop import load_run
    from training.models.gan import Generator
    from training.models.vae import VAE

    target = args.target
    if target.suffix == ".onnx":
        if not target.is_file():
            raise ConfigError(f"{target}: no such file")
        if args.raw or args.no_prior or args.sharpen is not None:
            flag = "--raw" if args.raw else "--no-prior" if args.no_prior else "--sharpen"
            raise ConfigError(f"{flag}: an .onnx file holds one graph; the flag is for runs")
        source = evaluate.onnx_source(target)
        judge = evaluator.load_judge(args.dataset or "mnist", args.data_dir)
        metrics = evaluate.evaluate_source(source, judge, args.samples, args.truncation)
        out = args.out or target.with_name(f"{target.stem}.metrics.json")
    else:
        if args.dataset:
            raise ConfigError("--dataset: a run knows what it trained on; the flag is for .onnx files")
        if args.sharpen is not None:
            check_sharpen(args.sharpen)
        trainer, _, _ = load_run(target)
        if args.raw and trainer.ema is None:
            raise ConfigError(f"--raw: {target} keeps no EMA, so its only weights are the raw ones")
        net = trainer.nets["generator"] if args.raw else trainer.sampler()
        assert isinstance(net, (Generator, VAE))
        if args.no_prior:
            if not isinstance(net, VAE) or net.prior is None:  # a Generator has no prior
                raise ConfigError(f"--no-prior: {target} has no prior flow")
            net.prior = None
        if args.sharpen is not None:
            net = sharpened(net, args.sharpen, target, log=lambda *_: None)
        suffix = ("-raw" if args.raw else "-no-prior" if args.no_prior else "") + (
            f"-sharpen{args.sharpen:g}" if args.sharpen is not None else "")
        source = evaluate.torch_source(target.name, net, trainer.num_classes)
        judge = evaluator.judge_for_run(trainer.config, args.data_dir)
        metrics = evaluate.evaluate_run(trainer, source, judge, args.samples, args.truncation)
        out = args.out or target / f"metrics{suffix}.json"
    print(evaluate.format_table(source.name, metrics))
    evaluate.write_metrics(out, metrics)
    print(f"wrote {out}")


def cmd_evaluator(args: argparse.Namespace) -> None:
    from training import evaluator

    report = evaluator.cached_report(args.dataset)  # its report needs no data: only training it does
    if report is None:
        report = evaluator.load_judge(args.dataset, args.data_dir).report
    print("\n".join(f"{key}: {value}" for key, value in report.items()))


def cmd_judge(args: argparse.Namespace) -> None:
    from service.manifest import MANIFEST_NAME, load_manifest
    from training import evaluator
    from training.atomic import write_text_atomic
    from training.judge_export import with_quality

    judge = evaluator.load_judge(args.dataset, args.data_dir)
    manifest = with_quality(load_manifest(args.models_dir), args.models_dir, judge, evaluator.KINDS[args.dataset],
                            samples=args.samples, renew=True)
    write_text_atomic(args.models_dir / MANIFEST_NAME, manifest.to_json())
    print(f"wrote {args.models_dir / MANIFEST_NAME}")


def cmd_truncation(args: argparse.Namespace) -> None:
    from service.manifest import load_manifest
    from training import evaluate, evaluator, pictures
    from training.atomic import write_text_atomic

    manifest = load_manifest(args.models_dir)
    models = [manifest.model(name) for name in manifest.names]  # the versions served unpinned
    names = {m.name for m in models}
    chosen = set(args.only or names)
    if chosen - names:
        raise ConfigError(f"--only {' '.join(sorted(chosen - names))}: not in {args.models_dir / 'manifest.json'}")
    path = args.models_dir / "truncation.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    sweeps = {name: rows for name, rows in earlier.items() if name in names - chosen}  # the others' rows stay
    judges: dict[str, evaluator.Judge] = {}
    for entry in models:
        if entry.name not in chosen:
            continue
        kind = evaluator.evaluator_dataset(entry.dataset)
        judge = judges[kind] = judges.get(kind) or evaluator.load_judge(entry.dataset, args.data_dir)
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
               raw=args.raw, serve=not args.no_serve, canary=args.canary, accept_worse=args.accept_worse,
               dense_rank=args.dense_rank, sharpen=args.sharpen)


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
    from training.evaluator import EvaluationError
    from training.export import ExportError
    from training.loop import RunError

    commands = {"list": lambda _: cmd_list(), "train": cmd_train, "evaluate": cmd_evaluate,
                "evaluator": cmd_evaluator, "judge": cmd_judge, "truncation": cmd_truncation, "export": cmd_export,
                "bundle": cmd_bundle}
    from torch.distributed import DistError

    from training.distributed import DistributedError

    rank = f"rank {os.environ.get('RANK', '?')}: " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
    try:
        commands[args.command](args)
    except (ConfigError, DataError, RunError, ExportError, ManifestError, EvaluationError, DistributedError) as err:
        print(f"error: {rank}{err}", file=sys.stderr)
        return 2
    except DistError as err:
        print(f"error: {rank}lost contact with the run's other processes ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else 'no detail'}); one of them failed or was stopped. "
              f"The last finished epoch is checkpointed: continue with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is checkpointed; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
