"""What every bench shares: library versions, and the JSON file a later run is compared with."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    """Write ``result`` to ``out`` or bench/results/<bench>-<device slug>-<date>.json, and say where."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = out or RESULTS_DIR / f"{bench}-{slug}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return out
