"""Where a model runs, for every model in ``models/``: ``resolve_device`` (the ``--device`` flag as a torch device this
machine has) and ``package_versions`` (the libraries it runs with, for its ``info()``)."""

from __future__ import annotations

import importlib.metadata

import torch


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
