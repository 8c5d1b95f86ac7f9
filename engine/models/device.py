"""Where a model runs, for every model in ``models/``: ``resolve_device`` (the ``--device`` flag as a torch device this
machine has) and ``package_versions`` (the libraries it runs with, for its ``info()``)."""

from __future__ import annotations

import importlib.metadata
import logging
import os

import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto", "cpu", "cuda", "cuda:N" (or a torch.device) -> a device this machine has; ValueError naming
    --device otherwise, never torch's RuntimeError."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: not supported; use auto, cpu, cuda or cuda:N")
    return dev


def package_versions(packages) -> dict[str, str | None]:
    """Installed version of each distribution; None where it is missing."""
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


# -- precision -------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Set, it is what "auto" means on this machine: one precision for a whole deployment, or a test suite
# whose fp32 references must not depend on the flags of the CPU it runs on (tests/conftest.py).
PRECISION_ENV = "MIMETIC_PRECISION"


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, detected now (never assumed): (yes or no, why).

    AMX-BF16 tiles or AVX512-BF16 dot products make bf16 matrix products about 2.5x faster than fp32
    (ViT-B-32's image tower on a 2-core Xeon with AMX); without them oneDNN emulates bf16 through fp32,
    slower than fp32 itself. The CPU's flags come from torch's cpuinfo, or else /proc/cpuinfo.
    """
    found = []
    probes = (("AMX-BF16", "_is_amx_tile_supported", "amx_bf16"), ("AVX512-BF16", "_is_avx512_bf16_supported", "avx512_bf16"))
    flags = None
    for name, probe, flag in probes:
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            supported = bool(check())
        else:  # an older torch: read the kernel's flags (Linux)
            if flags is None:
                flags = _proc_cpu_flags()
            supported = flag in flags
        if supported:
            found.append(name)
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN (mkldnn), which runs bf16 on the CPU"
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated (slower than fp32)"


def _proc_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``--precision`` on ``device`` -> ("fp32" | "bf16" | "fp16", why), the one rule every model follows.

    auto: fp16 on CUDA; bf16 on a CPU with native bf16 (``cpu_bf16``); fp32 otherwise; or, where
    $MIMETIC_PRECISION is set, that. An explicit precision is taken as asked (with a warning where
    the CPU only emulates it), except bf16 on a GPU without it (a ValueError naming --precision).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: not a precision; use one of {', '.join(PRECISIONS)}")
    pinned = os.environ.get(PRECISION_ENV, "").strip()
    if precision == "auto" and pinned:
        if pinned not in DTYPES:
            raise ValueError(f"${PRECISION_ENV}={pinned}: not a precision; use one of {', '.join(DTYPES)}")
        chosen, _ = resolve_precision(pinned, device)
        return chosen, f"{PRECISION_ENV}={pinned}"
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
        if precision == "auto":
            return "fp16", "fp16 on CUDA"
        return precision, "asked for"
    native, why = cpu_bf16()
    if precision == "bf16" and not native:
        log.warning("--precision bf16 on the CPU: %s; expect it to run slower than fp32", why)
        return "bf16", f"asked for ({why})"
    if precision == "fp16":  # no CPU matmul kernels run fp16 natively short of AMX-FP16
        log.warning("--precision fp16 on the CPU is emulated and slow; bf16 (where native) or fp32 are the CPU's precisions")
        return "fp16", "asked for (emulated on the CPU)"
    if precision != "auto":
        return precision, "asked for"
    return ("bf16", f"bf16: {why}") if native else ("fp32", f"fp32: {why}")

