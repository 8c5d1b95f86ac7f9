"""The tent filter's two ways of summing a row agree: vector runs (C-contiguous panoramas, short
footprints clear of the seam) and one tap at a time (any strides, wide footprints, the seam)."""

import numpy as np
import torch

from kernels import ViewSpec, reproject
from kernels.reference import reproject_reference

# 4096 wide at 90 deg into 224 px: footprints of 3 to 6 pixels, the vector runs' case; yaw 180
# puts a view's centre on the seam, pitch 80 takes its top rows over the pole.
VIEWS = [ViewSpec(yaw=45.0 * k, pitch=0.0, fov=90.0, width=224, height=224) for k in range(8)]
VIEWS += [ViewSpec(yaw=180.0, pitch=80.0, roll=30.0, fov=90.0, width=224, height=224)]


def strided_copy(pano: np.ndarray) -> torch.Tensor:
    """The same pixels in a buffer with padded rows and pixels: not C-contiguous, so the kernel
    can only read them tap by tap."""
    height, width, _ = pano.shape
    wide = torch.zeros(height, width, 4, dtype=torch.uint8)
    wide[..., :3] = torch.from_numpy(pano)
    strided = wide[..., :3]
    assert not strided.is_contiguous()
    return strided


def test_vector_runs_match_tap_by_tap_sums(louvre):
    contiguous = reproject([torch.from_numpy(louvre)], VIEWS, antialias=True)
    taps = reproject([strided_copy(louvre)], VIEWS, antialias=True)
    assert (contiguous - taps).abs().max().item() * 255 <= 1e-3  # float32 sums in either order


def test_wide_footprints_of_many_vector_blocks_match_tap_by_tap_sums(louvre):
    """28 px views of a 4096-wide panorama: footprints of about 40 pixels, five blocks of 8 per row, the last
    one partly past the footprint (weighted 0 there), and runs that end just clear of the seam."""
    views = [ViewSpec(yaw=7.0 * k, pitch=-20.0 + 9.0 * k, roll=5.0 * k, fov=90.0, width=28, height=21) for k in range(6)]
    views += [ViewSpec(yaw=172.0, pitch=0.0, fov=90.0, width=28, height=21)]  # columns up to the right edge
    contiguous = reproject([torch.from_numpy(louvre)], views, antialias=True)
    taps = reproject([strided_copy(louvre)], views, antialias=True)
    assert (contiguous - taps).abs().max().item() * 255 <= 1e-3
    assert contiguous.std().item() > 0.05  # real pictures, not a constant


def test_vector_runs_match_the_reference_at_the_seam_and_pole(louvre):
    """Footprints of 3 to 6 pixels (vector runs) on the seam and past the pole, against the float64 reference."""
    pano = np.ascontiguousarray(louvre[::2, ::2])  # 2048 wide: the reference is slow per pixel
    view = ViewSpec(yaw=180.0, pitch=80.0, roll=30.0, fov=90.0, width=112, height=112)
    expected = reproject_reference(pano, [view], antialias=True)[0]
    got = reproject([torch.from_numpy(pano)], [view], antialias=True)[0, 0].numpy().astype(np.float64) * 255
    assert np.abs(got - expected).max() <= 0.255  # the 1e-3 of tests/test_backends.py, in levels


def test_projection_grid_is_made_once_per_view_set_and_never_mixed_up(louvre):
    """The Numba path keeps pass 1's grid per view set: a second call finds it, another view set (or size,
    or antialias) gets its own, and the output is the same as from a fresh grid."""
    from kernels import numba_kernel

    pano = torch.from_numpy(louvre[::4, ::4].copy())
    ring = [ViewSpec(yaw=45.0 * k, pitch=10.0, fov=80.0, width=32, height=24) for k in range(4)]
    tilted = [ViewSpec(yaw=45.0 * k, pitch=-35.0, roll=20.0, fov=80.0, width=32, height=24) for k in range(4)]
    numba_kernel._GRIDS.clear()
    first = reproject([pano], ring, backend="numba")
    assert len(numba_kernel._GRIDS) == 1  # four yaws, one shape: one grid
    other = reproject([pano], tilted, backend="numba")
    plain = reproject([pano], ring, backend="numba", antialias=False)
    assert len(numba_kernel._GRIDS) == 3
    again = reproject([pano], ring, backend="numba")
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, plain)
    numba_kernel._GRIDS.clear()  # a fresh grid gives the same views
    assert torch.equal(reproject([pano], tilted, backend="numba"), other)
