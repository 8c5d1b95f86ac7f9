"""
One command that validates every CUDA path and measures it: ``python -m bench.gpu``
===================================================================================

When a GPU is lent it may be for minutes only, so those minutes go on measuring: nothing here
downloads, builds or installs. The steps run in order, each in a child process of its own with its
own time budget (so a crash, a hang or an out-of-memory in one step costs that step only); a step
stopped at its budget keeps what it measured, a failing step is reported and the rest go on. The
budgets add up to under 8 minutes on one H100 or H200.

1. environment: the GPU, driver, CUDA, torch, triton and xformers versions; free memory.
2. tests: ``pytest -m cuda``, and the Triton kernel against the float64 reference at several sizes,
   rolls and pitches, the poles and the seam included.
3. kernel: achieved GB/s against the bytes the kernel must move, as a fraction of the HBM roofline
   (read from the device where torch exposes it), 8 x 224^2 views from 1024- and 4096-wide
   panoramas, M = 1 to 256.
4. decode: nvJPEG batches against the CPU pool with DCT scaling, 4K panoramas/s, alone and together.
5. clip: ViT-B-32 and ViT-L-14 (random weights), model-only against the engine from JPEG, views/s at
   fp16, SDPA and xformers, batch 256 and 1024, with and without torch.compile.
6. diffusion: the Dreamer on CUDA, then the SD-1.5 UNet (random weights) in the guided denoising loop
   at 512^2, fp16, SDPA against xformers, compiled against not, it/s at batch 1 and 8.
7. summary: a table with each figure beside its anchor.

The JSON goes to ``bench/results/gpu-<device>-<date>.json`` (or ``--out``). ``--dry-run``, which
needs no CUDA, lists the steps with their budgets and checks that every import they need resolves.

    python -m bench.gpu [--dry-run] [--steps tests,kernel] [--out DIR]
    python -m bench.gpu --carry    # here, before: what the GPU machine lacks, into .device/ (README)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench._gpu_carry import DEVICE_DIR, carry
from bench._results import PANORAMAS, RESULTS_DIR, write_result

TOTAL_BUDGET_S = 8 * 60  # on one H100 or H200, start to finish
ANCHORS = {
    "clip_retrieval_img_per_s_a100": 2500,  # clip-retrieval's inference, per A100
    "goal_views_per_s_h100": 15_000,  # this engine: ViT-B-32, fp16, end to end from JPEG, one H100
    "stable_fast_it_per_s_h100": 104.6,  # stable-fast, SD 1.5, 512^2, batch 1, H100
}


@dataclass(frozen=True)
class StepSpec:
    name: str
    budget_s: int
    what: str
    function: str  # "module:function", run as function(Step) in a child process
    imports: tuple[str, ...]  # what it needs to import: "module", or "module:name,name" for names it takes from it
    optional: tuple[str, ...] = ()  # what it uses where installed (its cases are skipped otherwise)


STEPS = (
    StepSpec("environment", 20, "GPU, driver, CUDA, torch, triton, xformers versions; free memory", "bench._gpu_steps:environment",
             ("torch", "bench._results:versions", "engine.models.attention:xformers_available")),
    StepSpec("tests", 85, "pytest -m cuda; Triton vs the float64 reference (sizes, rolls, pitches, poles, seam)", "bench._gpu_steps:tests",
             ("pytest", "torch", "triton", "kernels:ViewSpec,reproject", "kernels.triton_kernel", "kernels.reference:reproject_reference",
              "kernels.numba_kernel", "bench.reproject:VIEWS")),
    StepSpec("kernel", 50, "Triton GB/s vs the bytes it must move, fraction of HBM peak; 1024/4096 wide, M = 1..256", "bench._gpu_steps:kernel",
             ("torch", "triton", "kernels.triton_kernel", "bench.reproject:VIEWS,pano_bytes_under_views,peak_bandwidth", "PIL")),
    StepSpec("decode", 40, "nvJPEG batch vs the CPU pool with DCT scaling, 4K panoramas/s, alone and together", "bench._gpu_steps:decode",
             ("torch", "torchvision.io:decode_jpeg", "engine.decode:decode_image,decode_jpeg_batch_cuda,required_width", "PIL")),
    StepSpec("clip", 155, "ViT-B-32 and ViT-L-14 fp16: model-only vs engine from JPEG; SDPA/xformers; batch 256/1024; compile",
             "bench._gpu_steps:clip", ("torch", "open_clip", "engine:Engine,EngineConfig,Panorama",
                                       "engine.models.attention:configure_attention,restore_attention,xformers_available"), ("xformers",)),
    StepSpec("diffusion", 95, "Dreamer on CUDA; SD-1.5 UNet img2img loop 512^2 fp16: SDPA/xformers, compiled, batch 1 and 8",
             "bench._gpu_steps:diffusion", ("torch", "diffusers:DDIMScheduler,UNet2DConditionModel", "diffusers.models.attention_processor:AttnProcessor2_0",
                                           "transformers", "bench.diffusion:SD15_SCHEDULER,SD15_UNET,denoise", "engine.models.diffusion:Dreamer",
                                           "engine.models.tiny_sd:make_tiny_sd"),
             ("xformers",)),
)
GRACE_S = 5  # a child's start (python, torch, CUDA context) beyond what the step itself counts


def run_step(spec: StepSpec, work: Path) -> dict:
    """Run one step in a child process under its budget; what it measured, its status, and why."""
    out = work / f"{spec.name}.json"
    command = [sys.executable, "-m", "bench.gpu", "--run-step", spec.function, "--budget", str(spec.budget_s), "--partial", str(out)]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=spec.budget_s + GRACE_S, cwd=Path(__file__).resolve().parents[1])
        status = "ok" if done.returncode == 0 else "failed"
        log = (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        status = "timed out"
        log = _text(exc.stdout)[-1500:] + _text(exc.stderr)[-1500:]
    figures = json.loads(out.read_text()) if out.is_file() else {}
    errors = [key for key, value in figures.items() if isinstance(value, dict) and "error" in value]
    if status == "ok" and errors:
        status = "partial"  # it ran to the end, but some cases failed
    return {"status": status, "budget_s": spec.budget_s, "wall_s": time.monotonic() - start, "failed_cases": errors,
            "figures": figures, "log_tail": log if status != "ok" else ""}


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def child(function: str, budget_s: float, partial: Path) -> int:
    """The child side: run ``module:function`` with a Step that writes ``partial`` as it goes."""
    from bench._gpu_steps import Step

    module, name = function.split(":")
    step = Step(name, budget_s - GRACE_S, partial)  # leave time to write before the parent's kill
    step.put("_started", time.time())
    getattr(importlib.import_module(module), name)(step)
    return 0


def panoramas_problem() -> str | None:
    """Why the steps cannot read the shared panoramas, or None. A machine that is sent the checkout alone
    lacks <root>/shared beside it: ``python -m bench.gpu --carry`` copies them into the checkout's ignored
    ``.device/``, which travels with it, and $MIMETIC_PANORAMAS names the copy."""
    if (PANORAMAS / "louvre.jpg").is_file():
        return None
    return (f"no louvre.jpg in {PANORAMAS}: run python -m bench.gpu --carry where the checkout sits beside ../shared, send "
            ".device/ along, and set MIMETIC_PANORAMAS=.device/panoramas")


def dry_run(steps) -> tuple[bool, list[dict]]:
    """Each step with its budget; every import it needs, resolved (imported), and its entry point found."""
    rows, ok = [], True
    for spec in steps:
        missing, optional_missing = [], []
        for name in spec.imports + spec.optional:
            module_name, _, names = name.partition(":")
            try:
                module = importlib.import_module(module_name)
                absent = [n for n in names.split(",") if n and not hasattr(module, n)]
                if absent:
                    raise ImportError(f"cannot import {', '.join(absent)} from {module_name}")
            except Exception as exc:  # any failure to import is what a dry run reports
                (optional_missing if name in spec.optional else missing).append(f"{name} ({type(exc).__name__}: {exc})"[:200])
        module, function = spec.function.split(":")
        try:
            if not callable(getattr(importlib.import_module(module), function)):
                missing.append(f"{spec.function} is not callable")
        except Exception as exc:
            missing.append(f"{spec.function} ({type(exc).__name__}: {exc})"[:200])
        ok &= not missing
        rows.append({"step": spec.name, "budget_s": spec.budget_s, "what": spec.what, "imports": list(spec.imports),
                     "missing": missing, "optional_missing": optional_missing})
    return ok, rows


def summary(steps: dict) -> list[dict]:
    """Each headline figure beside its anchor."""
    def figure(step, key, field):
        value = steps.get(step, {}).get("figures", {}).get(key, {})
        return value.get(field) if isinstance(value, dict) else None

    def best(step, prefix, suffix, field):
        found = [v.get(field) for k, v in steps.get(step, {}).get("figures", {}).items()
                 if k.startswith(prefix) and k.endswith(suffix) and isinstance(v, dict) and v.get(field)]
        return max(found) if found else None

    rows = []
    b32 = best("clip", "ViT-B-32_", "_engine", "views_per_s")
    l14 = best("clip", "ViT-L-14_", "_engine", "views_per_s")
    rows.append({"figure": "ViT-B-32 engine from JPEG, best views/s", "value": b32,
                 "anchor": "goal >= 15,000 views/s on an H100", "ratio": b32 / ANCHORS["goal_views_per_s_h100"] if b32 else None})
    rows.append({"figure": "ViT-B-32 engine from JPEG, best views/s", "value": b32,
                 "anchor": "clip-retrieval 2,500 img/s per A100", "ratio": b32 / ANCHORS["clip_retrieval_img_per_s_a100"] if b32 else None})
    rows.append({"figure": "ViT-L-14 engine from JPEG, best views/s", "value": l14,
                 "anchor": "clip-retrieval 2,500 img/s per A100", "ratio": l14 / ANCHORS["clip_retrieval_img_per_s_a100"] if l14 else None})
    sd = best("diffusion", "", "_b1", "it_per_s")
    rows.append({"figure": "SD-1.5 UNet loop 512^2 batch 1, best it/s", "value": sd,
                 "anchor": "stable-fast 104.6 it/s on an H100", "ratio": sd / ANCHORS["stable_fast_it_per_s_h100"] if sd else None})
    kernel = best("kernel", "w4096_", "_aa", "fraction_of_peak")
    rows.append({"figure": "Triton antialiased, 4096 wide, best fraction of HBM peak", "value": kernel, "anchor": "the roofline (1.0)", "ratio": kernel})
    nvjpeg, cpu = figure("decode", "nvjpeg", "panoramas_per_s"), figure("decode", "cpu_pool", "panoramas_per_s")
    both = figure("decode", "both", "total_per_s")
    for name, value in (("nvJPEG 4K panoramas/s", nvjpeg), ("CPU pool 4K panoramas/s", cpu), ("both at once, 4K panoramas/s", both)):
        rows.append({"figure": name, "value": value, "anchor": "2,000/s feeds 16,000 views/s", "ratio": value / 2000 if value else None})
    worst = figure("tests", "reference_worst", "max_abs_error")
    rows.append({"figure": "Triton vs float64 reference, worst |error|", "value": worst, "anchor": "tolerance 1e-3", "ratio": worst / 1e-3 if worst is not None else None})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[1])
    parser.add_argument("--dry-run", action="store_true", help="list the steps with their budgets and check their imports (no CUDA needed)")
    parser.add_argument("--carry", nargs="?", const=DEVICE_DIR, type=Path, default=None, metavar="DIR",
                        help="here, before a GPU is lent: put the wheels and the panoramas the GPU machine lacks into DIR "
                             "(default .device/ in the checkout), to send along with it")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of: {', '.join(s.name for s in STEPS)}")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="folder or .json file (default bench/results/)")
    parser.add_argument("--quick", action="store_true", help="accepted for bench.run_all; the budgets already bound the run")
    parser.add_argument("--run-step", default=None, help=argparse.SUPPRESS)  # the child side
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--partial", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_step:
        return child(args.run_step, args.budget, args.partial)
    if args.carry is not None:
        return carry(args.carry)

    steps = STEPS
    if args.steps:
        wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in STEPS})
        if unknown:
            parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(s.name for s in STEPS)}")
        steps = tuple(s for s in STEPS if s.name in wanted)

    import torch

    panoramas = panoramas_problem()
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device here: nothing to measure; this is the dry run (--dry-run)")
        ok, rows = dry_run(steps)
        total = sum(s.budget_s + GRACE_S for s in steps)
        print(f"{'step':<13}{'budget':>8}  what")
        for row in rows:
            print(f"{row['step']:<13}{row['budget_s']:>7}s  {row['what']}")
            for line in row["missing"]:
                print(f"{'':<23}MISSING import: {line}")
            for line in row["optional_missing"]:
                print(f"{'':<23}optional, not installed (its cases are skipped): {line}")
        print(f"{'summary':<13}{'0':>7}s  each figure beside its anchor (computed from the steps' JSON)")
        print(f"total budget {total} s with process starts (limit {TOTAL_BUDGET_S} s); imports {'all resolve' if ok else 'MISSING (see above)'}")
        print(f"panoramas: {panoramas or f'{PANORAMAS} (found)'}")
        return 0 if ok and not panoramas else 1
    if panoramas:  # every step but the first reads them: no GPU minute goes on steps that cannot run
        print(f"python -m bench.gpu: {panoramas}", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name(0)
    date = dt.date.today().isoformat()
    result = {"bench": "gpu", "date": date, "device": device, "budgets_s": {s.name: s.budget_s for s in steps}, "steps": {}}
    target = args.out if args.out is not None else RESULTS_DIR
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mimetic-gpu-") as work:
        for spec in steps:
            if time.monotonic() - started + spec.budget_s > TOTAL_BUDGET_S:
                result["steps"][spec.name] = {"status": "skipped", "why": "the total budget is spent"}
                continue
            print(f"[{time.monotonic() - started:5.0f} s] {spec.name} (budget {spec.budget_s} s) ...", flush=True)
            result["steps"][spec.name] = outcome = run_step(spec, Path(work))
            print(f"        {outcome['status']} in {outcome['wall_s']:.0f} s"
                  + (f"; failed cases: {', '.join(outcome['failed_cases'])}" if outcome["failed_cases"] else ""), flush=True)
            if outcome["status"] in ("failed", "timed out") and outcome["log_tail"]:
                print("        " + outcome["log_tail"][-600:].replace("\n", "\n        "))
            result["wall_s"] = time.monotonic() - started
            write_result("gpu", device, date, result, target)  # after every step: a lost machine loses one step
    result["summary"] = summary(result["steps"])
    print(f"\n{device}: summary ({result['wall_s']:.0f} s in all)")
    print(f"{'figure':<58}{'value':>12}  {'anchor':<36}{'ratio':>8}")
    for row in result["summary"]:
        value = f"{row['value']:.4g}" if isinstance(row["value"], (int, float)) else "-"
        ratio = f"{row['ratio']:.2f}" if isinstance(row["ratio"], (int, float)) else "-"
        print(f"{row['figure']:<58}{value:>12}  {row['anchor']:<36}{ratio:>8}")
    write_result("gpu", device, date, result, target)
    return 0 if all(s.get("status") == "ok" for s in result["steps"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
