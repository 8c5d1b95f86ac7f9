"""What every bench shares: library versions, and the JSON file a later run is compared with.

A run writes to ``bench/runs/`` (ignored by git) or to ``--out``. ``bench/results/`` holds the committed
reference results, which a run never writes: copy a run's file there to make it the new reference.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed reference results
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # each run's JSON, by default (gitignored)
OUT_HELP = "folder for the JSON result, or a .json file (default bench/runs/, not tracked by git)"


def versions(packages) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is missing."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def write_result(bench: str, device: str, date: str, result: dict, out: Path | None = None) -> Path:
    """Write ``result`` to ``<out or bench/runs>/<bench>-<device slug>-<date>.json`` (or to ``out`` itself
    when it names a .json file), and say where."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(out) if out is not None else RUNS_DIR
    if out.suffix != ".json":
        out = out / f"{bench}-{slug}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return out
