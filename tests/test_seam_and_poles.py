"""The seam (longitude +-180) and the poles are handled inside the stencil, with no discontinuity."""

import numpy as np
import pytest
import torch

from kernels import ViewSpec, reproject
from kernels.reference import reproject_reference

from .conftest import TRITON_DEVICE


@pytest.mark.parametrize("antialias", [False, True])
def test_view_across_the_seam_equals_the_rolled_panorama(louvre, antialias):
    """Yaw 180 straddles the seam; rolling the panorama by W/2 puts the same scene mid-image at yaw 0."""
    rolled = np.roll(louvre, louvre.shape[1] // 2, axis=1)
    across = reproject(torch.from_numpy(louvre)[None], [ViewSpec(yaw=180, width=128, height=96)], antialias=antialias)
    inside = reproject(torch.from_numpy(rolled)[None], [ViewSpec(yaw=0, width=128, height=96)], antialias=antialias)
    torch.testing.assert_close(across, inside, atol=1e-4, rtol=0)


def test_no_step_at_the_seam_column(louvre):
    """The columns either side of the seam differ no more than neighbouring columns elsewhere in the view."""
    view = reproject(torch.from_numpy(louvre)[None], [ViewSpec(yaw=180, fov=30, width=64, height=64)], antialias=False)[0, 0]
    steps = (view[:, :, 1:] - view[:, :, :-1]).abs().mean(dim=(0, 1))
    assert steps[31] <= 3 * steps.median()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("pitch", [90, -90])
def test_views_at_the_poles_are_consistent_under_yaw(louvre, antialias, pitch):
    """Looking straight up (or down), turning yaw by 90 deg only turns the image by a quarter."""
    pano = torch.from_numpy(louvre)[None]
    views = [ViewSpec(yaw=yaw, pitch=pitch, width=64, height=64) for yaw in (0, 90, 180, 270)]
    out = reproject(pano, views, antialias=antialias)[0]
    for quarter in range(1, 4):
        turns = -quarter if pitch > 0 else quarter
        torch.testing.assert_close(out[quarter], torch.rot90(out[0], turns, dims=(1, 2)), atol=1e-4, rtol=0)


def test_pole_crossing_reads_the_opposite_meridian():
    """A stencil row above row 0 is row 0 again on the opposite meridian, not a clamped copy.

    Row 0 is red over the front half (longitude -90..90) and blue over the back half. A view
    straight up with a 2 deg fov lands every pixel within half a row of the pole, so bilinear
    weights mix row 0 under the pixel with row 0 across the pole: front pixels come out mostly red
    but part blue, back pixels the reverse. Clamping at the edge would give pure colours.
    """
    pano = np.full((64, 128, 3), 128, dtype=np.uint8)
    pano[0] = (0, 0, 255)
    pano[0, 32:96] = (255, 0, 0)
    view = [ViewSpec(yaw=0, pitch=90, fov=2, width=8, height=8)]
    expected = reproject_reference(pano, view, antialias=False)[0] / 255
    for backend, device in (("numba", "cpu"), ("triton", TRITON_DEVICE)):
        out = reproject(torch.from_numpy(pano).to(device)[None], view, antialias=False, backend=backend).cpu()[0, 0]
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-3)
        # The two pixels either side of the centre: below it faces longitude 0 (front), above it
        # looks past the pole towards longitude 180 (back).
        front, back = out[:, 4, 4], out[:, 3, 4]
        assert 0.5 < front[0] < 0.8 and front[2] > 0.2, f"{backend}: front pixel {front.tolist()} did not cross the pole"
        assert 0.5 < back[2] < 0.8 and back[0] > 0.2, f"{backend}: back pixel {back.tolist()} did not cross the pole"


def test_yaw_offsets_equal_turning_every_view(jordan_pond):
    pano = torch.from_numpy(jordan_pond)
    views = [ViewSpec(yaw=y, pitch=p, roll=r, width=48, height=32) for y, p, r in [(0, 0, 0), (45, 30, 10), (-120, -70, 0)]]
    offsets = torch.tensor([0.0, 37.5, -200.0])
    with_offsets = reproject(torch.stack([pano] * 3), views, yaw_offsets=offsets)
    for m, offset in enumerate(offsets.tolist()):
        turned = [ViewSpec(v.yaw + offset, v.pitch, v.roll, v.fov, v.width, v.height) for v in views]
        torch.testing.assert_close(with_offsets[m], reproject(pano[None], turned)[0], atol=1e-4, rtol=0)
