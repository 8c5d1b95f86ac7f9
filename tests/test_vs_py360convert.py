"""Bilinear views agree with py360convert, the reference implementation of the convention."""

import itertools

import numpy as np
import py360convert
import pytest
import torch

from kernels import ViewSpec, reproject
from kernels.geometry import py360convert_fov

SIZE = 96
ANGLES = [(yaw, pitch) for yaw, pitch in itertools.product((0, 90, 180), (0, 60, -60, 85, -85))]


@pytest.mark.parametrize("image_name", ["louvre", "jordan_pond"])
@pytest.mark.parametrize("fov", [60, 90, 120])
def test_matches_py360convert(request, image_name, fov):
    pano = request.getfixturevalue(image_name)
    views = [ViewSpec(yaw=yaw, pitch=pitch, fov=fov, width=SIZE, height=SIZE) for yaw, pitch in ANGLES]
    ours = reproject(torch.from_numpy(pano)[None], views, antialias=False, layout="NHWC")[0].numpy() * 255
    for view, our_view in zip(views, ours, strict=True):
        theirs = py360convert.e2p(pano, py360convert_fov(fov, SIZE), view.yaw, view.pitch, (SIZE, SIZE), mode="bilinear")
        error = np.abs(our_view - theirs.astype(np.float64)).mean()
        assert error <= 1.0, f"{image_name} {view}: mean |ours - py360convert| = {error:.3f} levels"


def test_roll_matches_py360convert_in_rot(louvre):
    for roll in (90, -30, 150):
        view = ViewSpec(yaw=30, pitch=20, roll=roll, fov=90, width=SIZE, height=SIZE)
        ours = reproject(torch.from_numpy(louvre)[None], [view], antialias=False, layout="NHWC")[0, 0].numpy() * 255
        theirs = py360convert.e2p(louvre, py360convert_fov(90, SIZE), 30, 20, (SIZE, SIZE), in_rot_deg=roll)
        error = np.abs(ours - theirs.astype(np.float64)).mean()
        assert error <= 1.0, f"roll {roll}: mean |ours - py360convert| = {error:.3f} levels"


def test_unconverted_fov_would_not_match(louvre):
    """The fov conversion is load-bearing: passing our fov to py360convert unchanged misaligns the views."""
    view = ViewSpec(yaw=0, pitch=0, fov=90, width=SIZE, height=SIZE)
    ours = reproject(torch.from_numpy(louvre)[None], [view], antialias=False, layout="NHWC")[0, 0].numpy() * 255
    theirs = py360convert.e2p(louvre, 90, 0, 0, (SIZE, SIZE)).astype(np.float64)
    assert np.abs(ours - theirs).mean() > 2.0
