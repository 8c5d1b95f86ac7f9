"""What every bench shares: library versions, CUDA-event timing, and the JSON file a later run is compared with.

A run writes to ``bench/runs/`` (ignored by git) or to ``--out``. ``bench/results/`` holds the committed
reference results, which a run never writes: copy a run's file there to make it the new reference.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from engine.models.device import package_versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed reference results
RUNS_DIR = Path(__file__).resolve().parent / "runs"  # each run's JSON, by default (gitignored)
OUT_HELP = "folder for the JSON result, or a .json file (default bench/runs/, not tracked by git)"
# The real panoramas live beside the checkout, in <root>/shared/panoramas, never in it. $MIMETIC_PANORAMAS
# names another folder: on a machine that gets the checkout alone (a lent GPU), a copy carried into an
# ignored folder of it. tests/conftest.py reads the same variable.
PANORAMAS = Path(os.environ.get("MIMETIC_PANORAMAS") or Path(__file__).resolve().parents[2] / "shared" / "panoramas").resolve()


versions = package_versions  # the installed version of each distribution, None where it is missing


def cuda_median(fn, *, repeats: int = 10, warmup: int = 3) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` from CUDA events, and every sample, after ``warmup`` calls (compilation,
    autotuning, caches)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples), samples


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
