"""Run every benchmark in ``bench/``: each module there with a ``main(argv)``, this one aside.

    python -m bench.run_all [--quick]

New benches are picked up by being dropped into the folder. A bench that fails is reported and
the rest still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def bench_modules() -> list[str]:
    """Module names of the benches, sorted so runs are reproducible."""
    names = (info.name for info in pkgutil.iter_modules([str(BENCH_DIR)]))
    return sorted(name for name in names if name != "run_all" and not name.startswith("_"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description="Run every bench in bench/.")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench (fewer repeats)")
    args = parser.parse_args(argv)

    failed = []
    for name in bench_modules():
        print(f"=== bench.{name} ===", flush=True)
        try:
            importlib.import_module(f"{__package__ or 'bench'}.{name}").main(["--quick"] if args.quick else [])
        except Exception:  # one broken bench must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
