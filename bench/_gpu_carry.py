"""What a lent GPU machine lacks for ``python -m bench.gpu``, prepared here: ``python -m bench.gpu --carry``.

The GPU machine is sent the checkout alone and reaches no index. Its image has Python 3.12 with PyTorch,
Triton, transformers, numba, pyarrow and much more, but not the rest of this project's dependencies,
nor the shared panoramas that live beside the checkout. This writes, into the checkout's ignored
``.device/`` (about 21 MiB, under the 64 MiB a checkout may send, to go along with it):

* ``.device/wheels``: a wheel of each package in ``CARRIED``, at the version installed here (the one
  the tests passed with), for CPython 3.12 on x86-64 Linux, without dependencies (the image has them);
* ``.device/panoramas``: a copy of the shared panoramas (``bench._results.PANORAMAS``).

Then, there, one command installs them from the folder and runs the validation:

    python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl && MIMETIC_PANORAMAS=.device/panoramas python3 -m bench.gpu

xformers is not carried (a build must match the image's torch and CUDA): its cases are skipped and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench._results import PANORAMAS

DEVICE_DIR = Path(__file__).resolve().parents[1] / ".device"
# The project's dependencies that the GPU image lacks, or has at versions older than the generated gRPC and
# protobuf code accepts (it refuses to load under an older runtime).
CARRIED = ("open_clip_torch", "ftfy", "wcwidth", "diffusers", "grpcio", "grpcio-health-checking", "grpcio-reflection",
           "protobuf", "googleapis-common-protos", "py360convert", "importlib_metadata")
TARGET = ("--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")


def pinned(names=CARRIED) -> list[str]:
    """``name==version`` as installed here; a package missing here is one clear error."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise SystemExit(f"python -m bench.gpu --carry: {name} is not installed here; pip install -e '.[dev]' first") from None
    return pins


def carry(out: Path = DEVICE_DIR) -> int:
    """Fill ``out`` (wheels/, panoramas/); 0, or 1 with pip's error."""
    wheels, panoramas = out / "wheels", out / "panoramas"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *TARGET, "--dest", str(wheels), *pinned()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        print(f"python -m bench.gpu --carry: pip download failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return 1
    if panoramas.exists():
        shutil.rmtree(panoramas)
    shutil.copytree(PANORAMAS, panoramas)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(list(wheels.glob('*.whl')))} wheels in {wheels}, the panoramas in {panoramas}: {size / 2**20:.1f} MiB to send along")
    print("there: python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl && "
          "MIMETIC_PANORAMAS=.device/panoramas python3 -m bench.gpu")
    return 0
