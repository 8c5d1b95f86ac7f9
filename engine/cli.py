"""The ``mimetic`` command: a thin shell over ``engine`` and ``kernels``; it holds no kernel code.

    mimetic version
    mimetic reproject PANO [PANO ...] --out DIR [--views ring8] [--size 224] [--fov F] [--no-antialias] [--backend auto]
    mimetic bench [--quick]

torch is imported inside the commands that need it, so ``mimetic --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from engine import __version__
from engine.views import DEFAULT_SIZE, PRESETS, describe_presets

# kernels.BACKENDS, written out so that building the parser does not import torch (a test keeps them equal).
BACKENDS = ("auto", "triton", "numba", "torch")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimetic",
        description="Cut 360° equirectangular panoramas into perspective views (CLIP and Stable Diffusion arrive in later versions).",
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
    rep.add_argument("--size", type=_positive_int, default=DEFAULT_SIZE, help=f"view width and height in pixels (default {DEFAULT_SIZE})")
    rep.add_argument("--fov", type=float, default=None, help="horizontal fov in degrees, edge to edge, replacing the preset's (90)")
    rep.add_argument("--no-antialias", dest="antialias", action="store_false", help="plain bilinear sampling instead of the footprint (tent) filter")
    rep.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default auto: triton on CUDA, numba on CPU)")

    bench = commands.add_parser(
        "bench", help="run the benchmarks (bench/run_all.py); results go to bench/results/", description="Run bench.run_all; extra arguments are passed on to it."
    )
    bench.add_argument("--quick", action="store_true", help="small sizes and few repeats, for a smoke run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "version":
        return cmd_version()
    if args.command == "reproject":
        return cmd_reproject(args)
    return cmd_bench(args, extra)


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


def _number(value: float) -> str:
    """45.0 -> '45', -90.0 -> '-90', 22.5 -> '22.5': for file names."""
    return f"{value:g}"


def _unique_stems(paths: list[str]) -> list[str]:
    """Each panorama's file-name stem; a repeated stem gets -2, -3, ... so outputs never overwrite each other."""
    used: set[str] = set()
    stems = []
    for path in paths:
        base = Path(path).stem or "pano"
        stem, count = base, 1
        while stem in used:
            count += 1
            stem = f"{base}-{count}"
        used.add(stem)
        stems.append(stem)
    return stems


def cmd_reproject(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from engine.decode import DecodeError, decode_image
    from engine.views import view_set
    from kernels import reproject

    try:
        views = view_set(args.views, size=args.size, fov=args.fov)
    except ValueError as exc:
        print(f"mimetic reproject: error: {exc}", file=sys.stderr)
        return 2
    # The panoramas go to the GPU when the backend may use it; reproject picks the kernel from their device.
    device = "cuda" if args.backend in ("auto", "triton") and torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    digits = len(str(len(views) - 1))
    names = [f"{index:0{digits}d}_y{_number(v.yaw)}_p{_number(v.pitch)}" for index, v in enumerate(views)]

    done, failed = [], []
    for path, stem in zip(args.panos, _unique_stems(args.panos), strict=True):
        try:
            pano = decode_image(path)
            panos = [torch.from_numpy(pano).to(device)]
            out = reproject(panos, views, out_dtype=torch.uint8, layout="NHWC", antialias=args.antialias, backend=args.backend)
        except (DecodeError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, DecodeError) else str(exc)
            print(f"mimetic reproject: error: {path}: {reason}", file=sys.stderr)
            failed.append({"source": path, "error": reason})
            continue
        files = []
        for name, view in zip(names, out[0].cpu().numpy(), strict=True):
            file_name = f"{stem}_{name}.png"
            Image.fromarray(view).save(args.out / file_name)
            files.append(file_name)
        done.append({"source": path, "stem": stem, "width": pano.shape[1], "height": pano.shape[0], "files": files})
        print(f"{path}: {len(files)} views -> {args.out}")

    manifest = {
        "mimetic_version": __version__,
        "view_set": args.views,
        "antialias": args.antialias,
        "backend": args.backend,
        "device": device,
        "views": [
            {"index": index, "yaw": v.yaw, "pitch": v.pitch, "roll": v.roll, "fov": v.fov, "width": v.width, "height": v.height}
            for index, v in enumerate(views)
        ],
        "file_pattern": "<stem>_<index>_y<yaw>_p<pitch>.png",
        "panoramas": done,
        "failed": failed,
    }
    tmp = args.out / "views.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, args.out / "views.json")
    if failed:
        print(f"mimetic reproject: {len(failed)} of {len(args.panos)} panoramas failed: {', '.join(f['source'] for f in failed)}", file=sys.stderr)
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
    result = run_all.main((["--quick"] if args.quick else []) + extra)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
