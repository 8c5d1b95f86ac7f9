"""Triton, Numba, the torch path and the float64 reference compute the same views."""

import numpy as np
import pytest
import torch

from kernels import ViewSpec, reproject
from kernels.reference import reproject_reference

from .conftest import TRITON_DEVICE


def random_case(seed: int):
    """Fresh random panoramas of two sizes and random views, everywhere on the sphere."""
    rng = np.random.default_rng(seed)
    panos = [rng.integers(0, 256, (h, 2 * h, 3), dtype=np.uint8) for h in (40, 64)]
    views = [
        ViewSpec(
            yaw=float(rng.uniform(-360, 360)),
            pitch=float(rng.uniform(-90, 90)),
            roll=float(rng.uniform(-180, 180)),
            fov=float(rng.uniform(10, 170)),
            width=24,
            height=18,
        )
        for _ in range(4)
    ]
    yaw_offsets = rng.uniform(-400, 400, size=len(panos))
    return panos, views, yaw_offsets


def poisoned_empty(monkeypatch):
    """Make every output allocation start as NaN, so an element a kernel forgets to write shows up."""
    real_empty = torch.empty

    def empty(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def reference(panos, views, yaw_offsets, antialias):
    return np.stack(
        [reproject_reference(p, views, antialias=antialias, yaw_offset=off) / 255 for p, off in zip(panos, yaw_offsets, strict=True)]
    )


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_numba_and_triton_match_the_reference(monkeypatch, seed, antialias):
    panos, views, yaw_offsets = random_case(seed)
    expected = reference(panos, views, yaw_offsets, antialias)
    poisoned_empty(monkeypatch)
    for backend, device in (("numba", "cpu"), ("triton", TRITON_DEVICE)):
        out = reproject(
            [torch.from_numpy(p).to(device) for p in panos],
            views,
            antialias=antialias,
            yaw_offsets=torch.from_numpy(yaw_offsets),
            backend=backend,
        ).cpu()
        assert not out.isnan().any(), f"{backend} left output elements unwritten"
        error = np.abs(out.numpy() - expected).max()
        assert error <= 1e-3, f"{backend} antialias={antialias}: max |out - reference| = {error:.2e}"


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_nhwc_layout_and_dtypes_are_the_same_values(monkeypatch, backend):
    device = "cpu" if backend == "numba" else TRITON_DEVICE
    panos, views, _ = random_case(2)
    batch = torch.from_numpy(np.stack([panos[0], panos[0][:, ::-1]])).to(device)  # a stacked (M, H, W, 3) input
    poisoned_empty(monkeypatch)
    nchw = reproject(batch, views, backend=backend).cpu()
    nhwc = reproject(batch, views, layout="NHWC", backend=backend).cpu()
    assert nhwc.shape == (2, len(views), 18, 24, 3)
    assert not nhwc.isnan().any()
    torch.testing.assert_close(nhwc.permute(0, 1, 4, 2, 3), nchw, atol=1e-6, rtol=0)
    half = reproject(batch, views, out_dtype=torch.float16, backend=backend).cpu()
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), nchw, atol=1e-3, rtol=0)
    as_uint8 = reproject(batch, views, out_dtype=torch.uint8, backend=backend).cpu()
    assert as_uint8.dtype == torch.uint8
    assert (as_uint8.float() - nchw * 255).abs().max() <= 0.5 + 1e-3  # rounded, not truncated


def test_normalisation_presets():
    panos, views, _ = random_case(3)
    pano = torch.from_numpy(panos[1])[None]
    plain = reproject(pano, views)
    clip = reproject(pano, views, normalize="clip")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(clip, (plain - mean) / std, atol=1e-5, rtol=0)
    torch.testing.assert_close(reproject(pano, views, normalize="sd"), plain * 2 - 1, atol=1e-6, rtol=0)
    custom = reproject(pano, views, normalize=((0.5, 0.4, 0.3), (0.2, 0.2, 0.25)))
    expected = (plain - torch.tensor([0.5, 0.4, 0.3]).view(1, 1, 3, 1, 1)) / torch.tensor([0.2, 0.2, 0.25]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(custom, expected, atol=1e-5, rtol=0)


def test_torch_grid_sample_path_agrees_with_numba():
    panos, views, yaw_offsets = random_case(4)
    tensors = [torch.from_numpy(p) for p in panos]
    kwargs = {"antialias": False, "yaw_offsets": torch.from_numpy(yaw_offsets)}
    numba_out = reproject(tensors, views, backend="numba", **kwargs)
    torch_out = reproject(tensors, views, backend="torch", **kwargs)
    torch.testing.assert_close(torch_out, numba_out, atol=1e-3, rtol=0)


def test_panoramas_are_read_in_place_through_strides():
    """A non-contiguous panorama (a horizontal flip, a crop of a wider buffer) is read as it lies."""
    panos, views, _ = random_case(5)
    flipped = torch.from_numpy(panos[0]).flip(1)
    wide = torch.zeros(40, 100, 3, dtype=torch.uint8)
    wide[:, 10:90] = flipped
    strided = wide[:, 10:90]
    assert not strided.is_contiguous()
    expected = reproject([flipped.contiguous()], views, backend="numba")
    for backend, device in (("numba", "cpu"), ("triton", TRITON_DEVICE)):
        got = reproject([strided.to(device)], views, backend=backend).cpu()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_triton_footprints_wider_than_one_chunk_of_columns_match_the_reference(monkeypatch):
    """The Triton kernel reads columns in chunks of 8 taps: footprints of ~20 columns (3 chunks) and a pole's
    (every longitude) must sum every chunk once."""
    pano = np.random.default_rng(7).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    views = [ViewSpec(yaw=170.0, pitch=20.0, roll=15.0, fov=120.0, width=6, height=4),
             ViewSpec(yaw=-30.0, pitch=90.0, fov=100.0, width=6, height=4)]
    expected = reference([pano], views, [0.0], True)
    poisoned_empty(monkeypatch)
    out = reproject([torch.from_numpy(pano).to(TRITON_DEVICE)], views, backend="triton").cpu()
    error = np.abs(out.numpy() - expected).max()
    assert error <= 1e-3, f"max |out - reference| = {error:.2e}"
