"""The ``mimetic`` command: a thin shell over ``engine`` and ``kernels``; it holds no kernel code.

    mimetic version
    mimetic reproject PANO [PANO ...] --out DIR [--views ring8] [--size 224] [--fov F] [--no-antialias] [--backend auto]
    mimetic bench [--quick] [--out DIR]

torch is imported inside the commands that need it, so ``mimetic --help`` answers at once.

Every command runs under one error handler (``main``): a user's mistake (a flag, a path, a model or
weights that cannot be found, a device that is not there) raises ``ValueError`` or ``OSError`` (the
project's typed errors are ``ValueError``s), and is printed as one line, ``mimetic CMD: error: ...``,
with exit status 2; Ctrl-C exits with 130. ``MIMETIC_TRACEBACK=1`` lets the exception through, with
its traceback, for debugging.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from engine import __version__
from engine.models.allocator import keep_freed_memory
from engine.views import DEFAULT_SIZE, PRESETS, describe_presets

# Commands that live beside the features they drive, each a module with add_parsers(commands) and
# run(args) -> exit status, or None when the command is not its own. They import torch lazily.
COMMAND_MODULES = ("engine.dream.cli", "engine.dream.caption_cli", "engine.serve.cli", "engine.ingest.cli", "engine.analysis.cli")

TRACEBACK_ENV = "MIMETIC_TRACEBACK"  # =1: a user's error raises with its traceback instead of one line
USAGE_ERROR = 2  # the exit status of a user's mistake, as argparse uses for a bad flag
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EPILOG = (
    "A mistake in a flag, a path, a model or its weights is reported as one line, "
    f"'mimetic COMMAND: error: ...', with exit status {USAGE_ERROR}; Ctrl-C exits with {INTERRUPTED}. "
    f"Set {TRACEBACK_ENV}=1 to see the full traceback instead."
)


class _KernelBackends(Sequence):
    """``kernels.BACKENDS``, read only when argparse needs the choices (to check a ``--backend`` given, or to
    list them in ``mimetic reproject --help``): importing ``kernels`` imports torch, and building the parser
    must not."""

    def __getitem__(self, index):
        from kernels import BACKENDS

        return BACKENDS[index]

    def __len__(self) -> int:
        from kernels import BACKENDS

        return len(BACKENDS)


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (DESIGN.md, "Errors"): ``mimetic CMD: error: ...``, exit 2.

    Every subcommand's parser is one of these too (``add_subparsers`` makes its parsers of the parent's class).
    """

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _command_modules():
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _bounded_int(text, 0, "an integer >= 0")


def _bounded_int(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mimetic",
        description="Cut 360° equirectangular panoramas into perspective views, read them with CLIP and redraw them with Stable Diffusion.",
        epilog=EPILOG,
    )
    parser.add_argument("-V", "--version", action="version", version=f"mimetic {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("version", help="print the versions of mimetic, torch, triton and numba, and whether CUDA is available")

    presets = "; ".join(f"{name}: {text}" for name, text in describe_presets().items())
    rep = commands.add_parser(
        "reproject",
        help="cut panoramas into perspective views and write them as PNGs",
        description=(
            "Decode each panorama, cut all its views in one kernel call, and write OUT/<stem>_<index>_y<yaw>_p<pitch>.png "
            "plus OUT/views.json describing what was written. A panorama that fails is reported and skipped; "
            "the exit status is 1 if any failed."
        ),
    )
    rep.add_argument("panos", nargs="+", metavar="PANO", help="equirectangular panorama files (2:1, any format PIL reads)")
    rep.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created if missing)")
    rep.add_argument("--views", default="ring8", choices=list(PRESETS), help=f"view-set preset (default ring8). {presets}")
    rep.add_argument("--size", type=positive_int, default=DEFAULT_SIZE, help=f"view width and height in pixels (default {DEFAULT_SIZE})")
    rep.add_argument("--fov", type=float, default=None, help="horizontal fov in degrees, edge to edge, replacing the preset's (90)")
    rep.add_argument("--no-antialias", dest="antialias", action="store_false", help="plain bilinear sampling instead of the footprint (tent) filter")
    rep.add_argument("--backend", default="auto", choices=_KernelBackends(), metavar="BACKEND",
                     help="kernel backend: %(choices)s (default auto: triton on CUDA, numba on CPU)")

    embed = commands.add_parser(
        "embed",
        help="embed panoramas with CLIP: per-view and pooled embeddings plus zero-shot readings, to Parquet",
        description="One row per view and one pooled row per panorama in OUT (Parquet); prints the top labels per panorama.",
    )
    embed.add_argument("panos", nargs="+", metavar="PANO", help="equirectangular panorama files (JPEG, PNG, WebP)")
    embed.add_argument("--out", required=True, type=Path, help="Parquet file to write")
    add_engine_arguments(embed)

    demo = commands.add_parser(
        "demo",
        help="offline demonstration: a synthetic street scene (plus any PANO given) through the engine",
        description=(
            "Builds a procedural street panorama (synthetic, labelled as such), adds any panoramas given, "
            "embeds them all and writes DIR/results.parquet, DIR/info.json and the synthetic panorama. Without "
            "--clip-weights or a local-dir model it uses random weights, and says so."
        ),
    )
    demo.add_argument("panos", nargs="*", metavar="PANO", help="more panoramas to embed alongside the synthetic one")
    demo.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    add_engine_arguments(demo)

    models = commands.add_parser("models", help="model utilities")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    tiny = model_commands.add_parser(
        "make-tiny",
        help="write tiny untrained models for tests and offline demos: open_clip in DIR/clip (local-dir), diffusers in DIR/sd",
    )
    tiny.add_argument("dir", type=Path, metavar="DIR")

    for module in _command_modules():
        module.add_parsers(commands)

    bench = commands.add_parser(
        "bench",
        help="run the benchmarks (bench/run_all.py); each writes its JSON to bench/runs/ (or --out)",
        description=(
            "Run bench.run_all; extra arguments are passed on to it. Each bench prints a table and writes "
            "<bench>-<device>-<date>.json to --out. The reference results in bench/results/ are never overwritten."
        ),
    )
    bench.add_argument("--quick", action="store_true", help="small sizes and few repeats, for a smoke run")
    bench.add_argument("--out", type=Path, default=None, metavar="DIR", help="folder for the JSON results (default bench/runs/, not tracked by git)")
    return parser


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # before any thread allocates: each keeps the malloc arena it first had
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = os.environ.get(TRACEBACK_ENV, "") == "1"
    try:
        return run_command(args, extra)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mimetic {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, OSError) as exc:  # the typed errors (WeightsError, DecodeError, ...) are ValueErrors
        if debug:
            raise
        print(f"mimetic {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return USAGE_ERROR


def error_line(exc: BaseException) -> str:
    """An exception as one line: an OSError as "PATH: reason", anything else as its message."""
    if isinstance(exc, OSError) and exc.strerror:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        text = ": ".join([*paths, exc.strerror]) if paths else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run_command(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the parsed command; errors propagate to ``main``'s one handler."""
    if args.command == "version":
        return cmd_version()
    if args.command == "reproject":
        return cmd_reproject(args)
    if args.command == "embed":
        return cmd_embed(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "models":
        return cmd_models(args)
    if args.command == "bench":
        return cmd_bench(args, extra)
    for module in _command_modules():
        status = module.run(args)
        if status is not None:
            return status
    # argparse accepts only the commands it was given, so this is a command added without a runner.
    raise NotImplementedError(f"mimetic {args.command}: no runner for this command")


# -- the Engine's settings as flags ---------------------------------------------------------------


def add_engine_arguments(parser: argparse.ArgumentParser, *, only=None, exclude=()) -> None:
    """One flag per EngineConfig field (``--clip-model``, ``--random-weights``, ``--batch-size``, ...).

    Each flag's help is its field's ``help`` plus its default. ``only`` keeps just the named fields (a
    command that uses a few of them), ``exclude`` leaves some out (a command with its own flag of that
    name); ``config_from_args`` gives a field without a flag its default.
    """
    from dataclasses import fields

    from engine.config import EngineConfig

    group = parser.add_argument_group("engine")
    for spec in fields(EngineConfig):
        if (only is not None and spec.name not in only) or spec.name in exclude:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default, text = spec.default, spec.metadata["help"]
        if spec.name == "views":
            text += f", one of {', '.join(PRESETS)} (`mimetic reproject --help` describes each)"
        if isinstance(default, bool):
            if default:
                group.add_argument("--no-" + spec.name.replace("_", "-"), dest=spec.name, action="store_false", default=True, help=f"turn off {text}")
            else:
                group.add_argument(flag, dest=spec.name, action="store_true", default=False, help=text)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=spec.name, default=",".join(default), help=f"{text} (default {','.join(default)})")
        elif isinstance(default, int):
            kind = nonnegative_int if spec.metadata.get("minimum") == 0 else positive_int
            group.add_argument(flag, dest=spec.name, type=kind, default=default, help=f"{text} (default {default})")
        else:
            shown = f" (default {default})" if default is not None else ""
            group.add_argument(flag, dest=spec.name, default=default, choices=spec.metadata.get("choices"), help=text + shown)


def config_from_args(args: argparse.Namespace):
    from dataclasses import fields

    from engine.config import EngineConfig

    values = {}
    for spec in fields(EngineConfig):
        value = getattr(args, spec.name, spec.default)
        if isinstance(spec.default, tuple) and isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        values[spec.name] = value
    return EngineConfig(**values)


def _print_readings(result) -> None:
    if result.error:
        print(result.error, file=sys.stderr)  # the error names its item: "bad/x.jpg: truncated JPEG ..."
        return
    parts = []
    for name, reading in result.readings.items():
        top = ", ".join(f"{label} {p:.2f}" for label, p in reading["pooled"][:3])
        parts.append(f"{name}: {top}")
    print(f"{result.id}: " + " | ".join(parts))


def _embed_files(engine, paths: list[str], extra=(), thumbnails: int | None = None) -> list:
    from engine.pipeline import Panorama

    panoramas = [*extra, *(Panorama(id=path, data=path) for path in paths)]
    results = []
    for result in engine.embed_iter(panoramas, thumbnails=thumbnails):
        _print_readings(result)
        results.append(result)
    return results


def cmd_embed(args: argparse.Namespace) -> int:
    from engine.pipeline import Engine
    from engine.results import write_parquet

    engine = Engine(config_from_args(args))
    results = _embed_files(engine, args.panos)
    write_parquet(results, args.out, engine.config)
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} panoramas embedded -> {args.out}")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from engine.demo import DEMO_THUMBNAILS, SYNTHETIC_NOTE, demo_report, street_scene
    from engine.pipeline import Engine, Panorama
    from engine.results import write_parquet

    config = config_from_args(args)
    if config.clip_weights is None and not config.clip_model.startswith("local-dir:"):
        config.random_weights = True  # no real weights: the demo still runs, and the engine says so loudly
    args.out.mkdir(parents=True, exist_ok=True)
    scene = street_scene()
    Image.fromarray(scene).save(args.out / "synthetic-street.png")
    engine = Engine(config)
    synthetic = Panorama(id="synthetic-street", data=scene, meta={"source": SYNTHETIC_NOTE})
    results = _embed_files(engine, args.panos, extra=[synthetic], thumbnails=DEMO_THUMBNAILS)
    write_parquet(results, args.out / "results.parquet", engine.config)
    (args.out / "info.json").write_text(json.dumps(engine.info(), indent=2) + "\n")
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} panoramas embedded -> {args.out}/results.parquet")
    print(f"what the engine saw: {demo_report(engine, args.out)}")
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine.dream.cli import make_tiny_sd
    from engine.models.tiny import make_tiny_clip

    path = make_tiny_clip(args.dir)
    print(f"tiny untrained open_clip model written to {path}; load it with --clip-model local-dir:{path}")
    make_tiny_sd(args.dir)
    from engine.models.tiny_caption import make_tiny_caption

    path = make_tiny_caption(args.dir)
    print(f"tiny untrained BLIP captioner written to {path}; load it with --caption-model {path}")
    return 0


def cmd_version() -> int:
    def dist_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    print(f"mimetic {__version__}")
    print(f"python  {platform.python_version()}")
    for name in ("torch", "triton", "numba"):
        print(f"{name:<7} {dist_version(name)}")
    try:
        import torch
    except ImportError:
        print("cuda    unknown (torch is not importable)")
        return 0
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"cuda    available: {names} (CUDA {torch.version.cuda})")
    else:
        print(f"cuda    not available (torch built for CUDA {torch.version.cuda})" if torch.version.cuda else "cuda    not available (CPU-only torch)")
    return 0


def cmd_reproject(args: argparse.Namespace) -> int:
    from engine.views import write_views

    def report(entry: dict) -> None:
        if "error" in entry:
            print(f"mimetic reproject: error: {entry['source']}: {entry['error']}", file=sys.stderr)
        else:
            print(f"{entry['source']}: {len(entry['files'])} views -> {args.out}")

    manifest = write_views(args.panos, args.out, views=args.views, size=args.size, fov=args.fov, antialias=args.antialias,
                           backend=args.backend, report=report)
    failed = [entry["source"] for entry in manifest["failed"]]
    if failed:
        print(f"mimetic reproject: {len(failed)} of {len(args.panos)} panoramas failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from bench import run_all
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.run_all"):
            raise
        print(f"mimetic bench: error: bench/run_all.py is not available ({exc})", file=sys.stderr)
        return 1
    options = (["--quick"] if args.quick else []) + (["--out", str(args.out)] if args.out else [])
    result = run_all.main(options + extra)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
