"""Shared test helpers and fixtures.

The real panoramas live outside the repository, in ``<root>/shared/panoramas`` next to the checkout
at ``<root>/main`` (see ``../shared/panoramas/SOURCES.md``); they are never copied in.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Without CUDA, the Triton kernel runs in Triton's CPU interpreter (slow: tests keep its inputs small).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if TRITON_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite compares models with fp32 references (open_clip's own, HF's own): "auto" means fp32 here
# on any CPU, bf16 or not. tests/test_precision.py runs bf16 and auto's own choice explicitly.
os.environ.setdefault("MIMETIC_PRECISION", "fp32")

REPO_ROOT = Path(__file__).resolve().parents[1]
# <root>/shared/panoramas, or $MIMETIC_PANORAMAS (as bench._results.PANORAMAS: a copy carried to a machine
# that gets the checkout alone).
PANORAMAS = Path(os.environ.get("MIMETIC_PANORAMAS") or Path(__file__).resolve().parents[2] / "shared" / "panoramas").resolve()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def panoramas_dir() -> Path:
    """The shared panoramas directory, ``<root>/shared/panoramas`` (``axes.png``, ``louvre.jpg``, ...)."""
    if not PANORAMAS.is_dir():
        pytest.fail(f"shared panoramas not found at {PANORAMAS}: the repo must sit at <root>/main next to <root>/shared, "
                    "or $MIMETIC_PANORAMAS name a copy of them")
    return PANORAMAS


@pytest.fixture(scope="session")
def axes(panoramas_dir) -> np.ndarray:
    """``axes.png``, the labelled cube-face orientation panorama, as uint8 (512, 1024, 3)."""
    return _load(panoramas_dir, "axes.png")


def _load(panoramas_dir: Path, name: str) -> np.ndarray:
    with Image.open(panoramas_dir / name) as im:
        return np.array(im.convert("RGB"))


@pytest.fixture(scope="session")
def louvre(panoramas_dir) -> np.ndarray:
    """``louvre.jpg`` as uint8 (2048, 4096, 3)."""
    return _load(panoramas_dir, "louvre.jpg")


@pytest.fixture(scope="session")
def jordan_pond(panoramas_dir) -> np.ndarray:
    """``jordan-pond.jpg`` as uint8 (2048, 4096, 3)."""
    return _load(panoramas_dir, "jordan-pond.jpg")


@pytest.fixture(scope="session")
def panoramas(louvre, jordan_pond) -> dict[str, bytes]:
    """louvre and jordan-pond at 512x256, as JPEG bytes (quality 90): small real inputs for the service tests."""
    out = {}
    for name, image in (("louvre", louvre), ("pond", jordan_pond)):
        buffer = io.BytesIO()
        Image.fromarray(image).resize((512, 256), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=90)
        out[name] = buffer.getvalue()
    return out
