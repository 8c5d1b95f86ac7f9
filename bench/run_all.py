"""Run every benchmark in ``bench/``: each module there with a ``main(argv)``, this one aside.

    python -m bench.run_all [--quick] [--out DIR] [--only reproject,clip]

Each bench writes its JSON to bench/runs/ (gitignored) or to --out; the committed reference results
in bench/results/ are left alone. New benches are picked up by being dropped into the folder. A bench that fails is reported and
the rest still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import traceback
from pathlib import Path

from bench._results import OUT_HELP

BENCH_DIR = Path(__file__).resolve().parent


def bench_modules() -> list[str]:
    """Module names of the benches, sorted so runs are reproducible."""
    names = (info.name for info in pkgutil.iter_modules([str(BENCH_DIR)]))
    return sorted(name for name in names if name != "run_all" and not name.startswith("_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description="Run every bench in bench/.")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench (fewer repeats)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    parser.add_argument("--only", default=None, metavar="NAMES", help=f"comma-separated benches to run (default all: {', '.join(bench_modules())})")
    args = parser.parse_args(argv)
    names = bench_modules()
    if args.only is not None:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"--only: unknown bench(es) {', '.join(unknown)}; the benches are {', '.join(names)}")
        names = [name for name in names if name in wanted]
    options = (["--quick"] if args.quick else []) + (["--out", str(args.out)] if args.out else [])

    failed = []
    for name in names:
        print(f"=== bench.{name} ===", flush=True)
        try:
            importlib.import_module(f"{__package__ or 'bench'}.{name}").main(options)
        except Exception:  # one broken bench must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
