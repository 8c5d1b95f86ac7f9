"""Minification filters over each pixel's footprint: fine patterns average out instead of aliasing."""

import numpy as np
import pytest
import torch

from kernels import ViewSpec, reproject

from .conftest import TRITON_DEVICE

RING8 = [ViewSpec(yaw=45.0 * k, pitch=0.0, fov=90.0, width=224, height=224) for k in range(8)]


def checkerboard(height: int) -> torch.Tensor:
    """A one-pixel black and white checkerboard panorama, (1, H, 2H, 3) uint8."""
    board = (np.add.outer(np.arange(height), np.arange(2 * height)) % 2 * 255).astype(np.uint8)
    return torch.from_numpy(np.repeat(board[..., None], 3, axis=-1))[None]


def test_checkerboard_comes_out_mid_grey_with_antialias():
    """4096 wide at 90 deg into 224 px is 3 to 6 source pixels per output pixel."""
    views = reproject(checkerboard(2048), RING8, antialias=True).numpy() * 255
    assert np.abs(views - 127.5).max() <= 3.0


def test_checkerboard_aliases_without_antialias():
    views = reproject(checkerboard(2048), RING8, antialias=False).numpy() * 255
    assert views.std() > 30.0
    assert np.abs(views - 127.5).max() > 100.0


def test_triton_antialias_greys_the_checkerboard_too():
    """The same 4.6x minification at interpreter-friendly size: 512 wide into 28 px."""
    views = [ViewSpec(yaw=45.0 * k, fov=90.0, width=28, height=28) for k in (0, 3)]
    board = checkerboard(256).to(TRITON_DEVICE)
    smooth = reproject(board, views, antialias=True, backend="triton").cpu().numpy() * 255
    aliased = reproject(board, views, antialias=False, backend="triton").cpu().numpy() * 255
    assert np.abs(smooth - 127.5).max() <= 3.0
    assert aliased.std() > 30.0


def test_magnification_is_plain_bilinear(louvre):
    """Where a view enlarges the panorama (footprint under one pixel) antialias changes nothing."""
    small = torch.from_numpy(np.ascontiguousarray(louvre[::16, ::16]))[None]  # 256 x 128
    view = [ViewSpec(yaw=20, pitch=10, fov=40, width=64, height=64)]
    torch.testing.assert_close(reproject(small, view, antialias=True), reproject(small, view, antialias=False))


@pytest.mark.parametrize(("size", "supersample"), [(56, 24), (224, 6)])
def test_antialiased_view_matches_an_ideal_supersampled_render(louvre, size, supersample):
    """The ground truth for a minified view: render it so large that every output pixel magnifies
    (bilinear is then exact), and average each block down to the target size. The filtered view
    comes within a level of it; the plain bilinear one is several levels off (aliasing)."""
    pano = torch.from_numpy(louvre)[None]
    big = ViewSpec(yaw=10, pitch=5, fov=90, width=size * supersample, height=size * supersample)
    ideal = reproject(pano, [big], antialias=False)[0, 0].view(3, size, supersample, size, supersample).mean(dim=(2, 4))
    view = [ViewSpec(yaw=10, pitch=5, fov=90, width=size, height=size)]
    filtered_error = (reproject(pano, view, antialias=True)[0, 0] - ideal).abs().mean() * 255
    aliased_error = (reproject(pano, view, antialias=False)[0, 0] - ideal).abs().mean() * 255
    assert filtered_error < 1.0
    assert filtered_error < 0.25 * aliased_error
