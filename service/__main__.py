"""`python -m service [--host] [--port] [--grpc-port] [--models-dir] [--workers]`: serve exported/ with uvicorn
(and gRPC).
`python -m service triton-repository OUT [--gpu]`: write the models as a Triton model repository.
`python -m service keygen NAME`: a new API key and its line for DIGITGEN_API_KEYS_FILE.
`python -m service prune [--models-dir] [--dry-run]`: remove the model files the manifest no longer lists.
`python -m service copy-models DEST [--models-dir] [--if-empty]`: copy a model set into a served folder, manifest last.
`python -m service batch OUT --n N [--model] [--digit] [--url | --models-dir]`: a folder of PNGs (or an .npz).

Flags override DIGITGEN_* environment variables; the settings and the plan reach the workers as values.
"""

import signal

# SIGHUP (reload) held back from the first instruction: its default action would end the supervisor while it
# imports; the supervisor's handler takes it once the workers are starting (service/workers.py).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

import argparse  # noqa: E402
import difflib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Mapping  # noqa: E402

from pydantic import ValidationError  # noqa: E402
from pydantic_settings import SettingsError  # noqa: E402

from service import logs, workers  # noqa: E402
from service.app import VERSION, create_app  # noqa: E402
from service.auth import KeyFileError, load_keys, new_key  # noqa: E402
from service.config import Settings  # noqa: E402
from service.http_protocol import Bounds  # noqa: E402
from service.inference.keeper import InferenceProcessError, serving  # noqa: E402
from service.lifecycle import Lifecycle  # noqa: E402
from service.manifest import ManifestError, load_manifest  # noqa: E402
from service.plan import make_plan  # noqa: E402
from service.ratelimit import Buckets, load_limits  # noqa: E402

COMMANDS = ("triton-repository", "keygen", "prune", "copy-models", "batch")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"triton-repository": triton_repository, "keygen": keygen, "prune": prune_command,
                "copy-models": copy_models_command, "batch": batch_command}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):  # serving takes flags only: a word first is a mistyped command
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        return _error(f"error: unknown command {argv[0]!r}{f' (did you mean {close[0]}?)' if close else ''}; the "
                      f"commands are {', '.join(COMMANDS)}; to serve, give flags only (python -m service --help)")
    args = serve_parser().parse_args(argv)
    flags = {flag: getattr(args, flag) for flag in ("host", "models_dir", "providers", "log_level", "workers",
                                                    "grpc_port") if getattr(args, flag) is not None}
    settings = checked_settings(flags)
    return settings if isinstance(settings, int) else serve(settings, args.port)


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"digit-gen {VERSION}")
    parser.add_argument("--host", help="interface to bind (DIGITGEN_HOST; default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=port_number, default=os.environ.get("DIGITGEN_PORT", "8000"),
                        help="port to listen on (DIGITGEN_PORT; default 8000)")
    parser.add_argument("--workers", type=int, help="uvicorn worker processes, each with every model "
                                                    "(DIGITGEN_WORKERS; default: one per CPU the process may use, on CUDA too)")
    parser.add_argument("--models-dir", help="folder with manifest.json (DIGITGEN_MODELS_DIR; default exported)")
    parser.add_argument("--providers", choices=("auto", "cuda", "cpu"), help="DIGITGEN_PROVIDERS (default auto)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="DIGITGEN_LOG_LEVEL")
    parser.add_argument("--grpc-port", type=port_number, help="serve the Open Inference Protocol over gRPC on this "
                                                              "port too (DIGITGEN_GRPC_PORT; default: off)")
    return parser


def checked_settings(flags: dict) -> Settings | int:
    """The settings, the manifest and the keys file checked before anything starts; the exit status (2,
    with one `error:` line naming the flag, variable or file) when one is wrong."""
    try:
        settings = Settings(**flags)
        load_manifest(settings.models_dir)  # fail here, with the field named, not inside a worker
        if settings.api_keys_file:
            load_keys(settings.api_keys_file)
            load_limits(settings.api_keys_file)
    except ValidationError as err:
        return _error("\n".join(_setting_error(problem, flags) for problem in err.errors()))
    except SettingsError as err:  # a list or object setting that is not JSON, such as DIGITGEN_CORS_ORIGINS
        field = str(err).split('field "', 1)[-1].split('"', 1)[0]
        return _error(f"error: DIGITGEN_{field.upper()}: not valid JSON; a list is written as "
                      f'["http://localhost:3000"]')
    except (ManifestError, KeyFileError) as err:
        return _error(f"error: {err}")
    return settings


def serve(settings: Settings, port: int) -> int:
    """Serve until SIGINT/SIGTERM: the plan, the inference process when there is one, the workers."""
    logs.configure(settings.log_level, settings.log_format, "supervisor")
    plan = make_plan(settings)
    if plan.workers == 1:  # served in this process
        logs.configure(settings.log_level, settings.log_format, "worker-0")
    options = {"host": settings.host, "port": port, "log_level": settings.log_level,
               "access_log": False,  # the service's own access log replaces uvicorn's (service/logs.py)
               "log_config": None, "log_format": settings.log_format,
               "bounds": Bounds(settings.max_request_line_bytes, settings.max_header_bytes, settings.header_timeout_s,
                                settings.body_timeout_s, settings.max_connections)}
    if settings.grpc_port:  # taken by another server? (the workers' own sockets share it, so ask first)
        try:
            workers.listening_socket(settings.host, settings.grpc_port, shared=False).close()
        except OSError as err:
            return _error(f"error: --grpc-port (DIGITGEN_GRPC_PORT) {settings.grpc_port}: {err.strerror or err}")
    with shared_metrics(plan.workers):
        try:
            with serving(settings, plan) as plan:
                host = f"[{settings.host}]" if ":" in settings.host else settings.host
                logging.getLogger("digitgen").info(
                    "digit-gen %s on http://%s:%d with %d worker(s)%s; reload the models: kill -HUP %d", VERSION,
                    host, port, plan.workers, f" and the inference process ({plan.device_providers[0]})"
                    if plan.inference_process else "", os.getpid())
                buckets = Buckets(load_limits(settings.api_keys_file)) if settings.api_keys_file else None
                return workers.run(partial(create_app, settings, plan, buckets=buckets), options, plan.workers,
                                   Lifecycle(settings, plan))
        except InferenceProcessError as err:
            return _error(f"error: the inference process (DIGITGEN_INFERENCE_PROCESS={settings.inference_process}): "
                          f"{err}; see its log above, or try DIGITGEN_INFERENCE_PROCESS=off")
        except OSError as err:
            return _error(f"error: --host {settings.host} --port {port}: {err.strerror or err}")


def port_number(text: str) -> int:
    """--port or DIGITGEN_PORT: an integer 0-65535 (argparse names the flag in its error)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (DIGITGEN_PORT or --port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0-65535 (DIGITGEN_PORT or --port)")
    return port


def keygen(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m service keygen",
                                     description="Print a new random API key and its line for DIGITGEN_API_KEYS_FILE "
                                                 "(the file holds the key's SHA-256, never the key).")
    parser.add_argument("name", metavar="NAME", help="who the key is for; /metrics counts requests by it")
    args = parser.parse_args(argv)
    try:
        key, line = new_key(args.name)
    except KeyFileError as err:
        return _error(f"error: {err}")
    print(f"key:  {key}\nline: {line}\n# give the key to its user; append the line to the keys file, e.g.\n"
          f"#   echo '{line}' >> keys.txt")
    return 0


def batch_command(argv: list[str]) -> int:
    from service import batch

    parser = argparse.ArgumentParser(
        prog="python -m service batch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw N images into OUT, a folder of PNGs (or OUT.npz), from a running service (--url) or "
                    "from a models folder's ONNX files; seeded (the same command gives the same images, from "
                    "either) and resumable (run it again to continue).\n\n" + batch.__doc__.split("\n\n", 1)[1])
    parser.add_argument("out", type=Path, metavar="OUT", help="a folder, or a file ending .npz")
    parser.add_argument("--n", type=_positive, required=True, help="how many images")
    parser.add_argument("--model", help="a model name (default: the default of /sample, or of /generate with --digit)")
    parser.add_argument("--version", help="one version of the model (default: the one it serves)")
    parser.add_argument("--digit", type=int, help="a conditional model: this class for every image (default: a "
                                                  "random class per image)")
    parser.add_argument("--seed", type=int, default=0, help="the first chunk's seed; chunk k uses seed + k (default 0)")
    parser.add_argument("--truncation", type=float, default=1.0, help="0 < t <= 1 (default 1)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    source.add_argument("--models-dir", type=Path, help="draw from this folder's ONNX files, without a service "
                                                        "(default, when --url is not given: exported)")
    parser.add_argument("--api-key", default=os.environ.get("DIGITGEN_API_KEY"), help="with --url: the key "
                                                                                       "(DIGITGEN_API_KEY)")
    args = parser.parse_args(argv)
    if not 0 < args.truncation <= 1:
        return _error(f"error: --truncation {args.truncation}: 0 < t <= 1")
    if args.seed < 0:
        return _error(f"error: --seed {args.seed}: 0 or more")
    flags = {"model": args.model, "version": args.version, "digit": args.digit, "truncation": args.truncation}
    try:
        if args.url:
            import httpx

            from service.client import Client, ServiceError
            with Client(args.url, args.api_key) as client:
                try:
                    drawn = batch.run(args.out, args.n, args.seed, batch.from_service(
                        client, args.model, args.version, args.digit, args.truncation), flags=flags | {"url": args.url})
                except ServiceError as err:
                    return _error(f"error: {args.url}: {err}")
                except httpx.HTTPError as err:  # nothing listening, a timeout after the retries
                    return _error(f"error: --url {args.url}: {err}")
        else:
            models_dir = args.models_dir or Path(Settings().models_dir)
            draw = batch.from_files(models_dir, args.model, args.version, args.digit, args.truncation)
            drawn = batch.run(args.out, args.n, args.seed, draw, flags=flags | {"models_dir": str(models_dir)})
    except (ValueError, ManifestError) as err:
        return _error(f"error: {err}")
    except OSError as err:
        return _error(f"error: {err.filename or args.out}: {err.strerror or err}")
    print(f"{args.out}: {args.n} images ({drawn} drawn now, {args.n - drawn} there already)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: 1 or more")
    return value


def prune_command(argv: list[str]) -> int:
    from service.prune import prune

    parser = argparse.ArgumentParser(
        prog="python -m service prune",
        description="Remove the model files (<name>/<version>.onnx) that the manifest no longer lists: export "
                    "never deletes one, since a running service or a rollback may still use it.")
    _models_dir_argument(parser)
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    try:
        removed, size = prune(Path(_models_settings(args.models_dir).models_dir), args.dry_run)
    except (ValidationError, ManifestError, OSError) as err:
        return _models_command_error(err, "nothing removed", args.models_dir)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} unlisted file(s), {size / 2**20:.1f} MiB")
    return 0


def copy_models_command(argv: list[str]) -> int:
    from service.copy_models import copy_models

    parser = argparse.ArgumentParser(
        prog="python -m service copy-models",
        description="Copy the model set of --models-dir into DEST, a folder services read (a shared volume): "
                    "every file checked against the manifest, each renamed into place, the manifest last. "
                    "Then send each service a SIGHUP to serve it.")
    parser.add_argument("dest", type=Path, metavar="DEST", help="the folder to publish into (created when missing)")
    _models_dir_argument(parser)
    parser.add_argument("--if-empty", action="store_true", help="do nothing when DEST has a manifest already")
    args = parser.parse_args(argv)
    try:
        copied, written = copy_models(Path(_models_settings(args.models_dir).models_dir), args.dest, args.if_empty)
    except (ValidationError, ManifestError, OSError) as err:
        return _models_command_error(err, "the manifest in DEST is unchanged", args.dest)
    print(f"{args.dest}: {len(copied)} file(s) copied, manifest {'written' if written else 'kept: DEST had one'}")
    return 0


def triton_repository(argv: list[str]) -> int:
    from service.triton import RepositoryError, write_repository

    parser = argparse.ArgumentParser(
        prog="python -m service triton-repository",
        description="Write OUT/<name>/config.pbtxt and OUT/<name>/1/model.onnx for every model of the manifest: "
                    "a repository for `tritonserver --model-repository OUT` (service/README.md: Scaling out).")
    parser.add_argument("out", type=Path, metavar="OUT", help="the repository folder (created when missing)")
    _models_dir_argument(parser)
    parser.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU (default KIND_CPU)")
    args = parser.parse_args(argv)
    try:
        settings = _models_settings(args.models_dir)
        names = write_repository(settings.models_dir, args.out, settings.batch_max_size, args.gpu)
    except RepositoryError as err:
        return _error(f"error: {err}")
    except (ValidationError, ManifestError, OSError) as err:
        return _models_command_error(err, "", args.out)
    print(f"wrote {', '.join(names)} into {args.out} (max_batch_size {settings.batch_max_size}, "
          f"{'KIND_GPU' if args.gpu else 'KIND_CPU'})")
    return 0


def _models_dir_argument(parser: argparse.ArgumentParser) -> None:
    """--models-dir of the commands that read a model set (prune, copy-models, triton-repository)."""
    parser.add_argument("--models-dir", type=Path, help="folder with manifest.json (DIGITGEN_MODELS_DIR; default exported)")


def _models_settings(models_dir: Path | None) -> Settings:
    """The settings of a command that reads a models folder (--models-dir, else DIGITGEN_MODELS_DIR)."""
    overrides: dict[str, Any] = {"models_dir": models_dir} if models_dir else {}
    return Settings(**overrides, providers="cpu")


def _models_command_error(err: Exception, consequence: str, path: Path | None) -> int:
    """A models command's failure: a setting refused, a manifest at fault (and `consequence`), or a file."""
    if isinstance(err, ValidationError):
        return _error(f"error: {err.errors()[0]['msg']}")
    if isinstance(err, OSError):
        return _error(f"error: {err.filename or path}: {err.strerror or err}")
    return _error(f"error: {err}{f'; {consequence}' if consequence else ''}")


def _setting_error(problem: Mapping[str, Any], flags: dict) -> str:
    """A refused setting, named as the user gave it: the flag when a flag gave it, else the variable."""
    field = "_".join(str(p) for p in problem["loc"])
    name = f"--{field.replace('_', '-')} (DIGITGEN_{field.upper()})" if field in flags else f"DIGITGEN_{field.upper()}"
    return f"error: {name}={problem.get('input')!r}: {problem['msg']}"


def _error(message: str) -> int:
    """A command-line failure: the message names the flag, variable or file; exit status 2."""
    print(message, file=sys.stderr)
    return 2


@contextmanager
def shared_metrics(processes: int):
    """With several workers, each keeps its Prometheus values in files of one folder and /metrics sums
    them (prometheus_client's multiprocess mode, which reads PROMETHEUS_MULTIPROC_DIR); otherwise a scrape
    would see one worker's share. The variable is restored afterwards."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if processes == 1:
        yield
    elif folder:  # the operator's folder: stale files from an earlier run would be counted again
        for stale in Path(folder).glob("*.db"):
            stale.unlink()
        yield
    else:
        with tempfile.TemporaryDirectory(prefix="digitgen-metrics-") as temporary:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = temporary
            try:
                yield
            finally:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]


if __name__ == "__main__":
    sys.exit(main())
