"""Orientation on the labelled cube-face panorama (axes.png), as ``shared/panoramas/SOURCES.md`` says."""

import numpy as np
import pytest
import torch

from kernels import ViewSpec, reproject

FACES = {  # the face colours of axes.png
    "red +Z": (255, 0, 0),
    "green +X": (115, 245, 25),
    "yellow -X": (255, 255, 10),
    "magenta +Y": (220, 60, 255),
    "cyan -Y": (30, 255, 255),
    "blue -Z": (30, 40, 255),
}


def face_at(view_rgb: np.ndarray, row: int, col: int) -> str:
    """The face most pixels of a 9x9 patch are nearest to in colour, ignoring the white labels."""
    patch = view_rgb[max(row - 4, 0) : row + 5, max(col - 4, 0) : col + 5].reshape(-1, 3).astype(float)
    patch = patch[patch.min(axis=1) < 200]
    if len(patch) == 0:
        return "white label"
    names = list(FACES)
    distances = np.linalg.norm(patch[:, None] - np.array([FACES[n] for n in names])[None], axis=-1)
    votes = np.bincount(distances.argmin(axis=1), minlength=len(names))
    return names[int(votes.argmax())]


def render(axes, view: ViewSpec, backend: str = "numba") -> np.ndarray:
    out = reproject(torch.from_numpy(axes)[None], [view], out_dtype=torch.uint8, layout="NHWC", backend=backend)
    return out[0, 0].numpy()


@pytest.mark.parametrize(
    ("view", "centre"),
    [
        (ViewSpec(yaw=0, pitch=0), "red +Z"),
        (ViewSpec(yaw=90, pitch=0), "green +X"),
        (ViewSpec(yaw=-90, pitch=0), "yellow -X"),
        (ViewSpec(yaw=180, pitch=0), "blue -Z"),
        (ViewSpec(yaw=0, pitch=90), "magenta +Y"),
        (ViewSpec(yaw=0, pitch=-90), "cyan -Y"),
    ],
)
def test_each_face_lands_in_the_centre(axes, view, centre):
    image = render(axes, view)
    assert face_at(image, 112, 112) == centre


def test_wide_view_has_its_neighbours_upright(axes):
    """At fov 120 the +Z face is framed by the sky above, floor below, -X left and +X right."""
    image = render(axes, ViewSpec(yaw=0, pitch=0, fov=120))
    assert face_at(image, 4, 112) == "magenta +Y"
    assert face_at(image, 219, 112) == "cyan -Y"
    assert face_at(image, 112, 4) == "yellow -X"
    assert face_at(image, 112, 219) == "green +X"


def test_roll_turns_the_scene_counter_clockwise(axes):
    """roll 90 turns +Z a quarter-turn counter-clockwise: magenta top on the left, as py360convert's in_rot_deg=90."""
    image = render(axes, ViewSpec(yaw=0, pitch=0, roll=90, fov=120))
    assert face_at(image, 112, 112) == "red +Z"
    assert face_at(image, 112, 4) == "magenta +Y"
    assert face_at(image, 112, 219) == "cyan -Y"
    assert face_at(image, 4, 112) == "green +X"
    assert face_at(image, 219, 112) == "yellow -X"


def test_fov_is_horizontal_and_vertical_follows_through_tan(axes):
    """A 2:1 view at fov 150: horizontally +-75 deg; vertically atan(tan(75)/2) = +-61.8 deg, not 150/4 = 37.5.

    The +Z face spans +-45 deg of latitude at its centre column, so only the tan rule puts the sky
    (magenta) and floor (cyan) at the top and bottom rows.
    """
    image = render(axes, ViewSpec(yaw=0, pitch=0, fov=150, width=224, height=112))
    assert face_at(image, 56, 112) == "red +Z"
    assert face_at(image, 4, 112) == "magenta +Y"
    assert face_at(image, 107, 112) == "cyan -Y"
    assert face_at(image, 30, 4) == "yellow -X"
    assert face_at(image, 30, 219) == "green +X"


def test_triton_matches_the_orientation(axes):
    small = np.ascontiguousarray(axes[::4, ::4])  # keeps the interpreter quick on CPU
    for view, centre in [(ViewSpec(yaw=90, width=32, height=32), "green +X"), (ViewSpec(pitch=90, width=32, height=32), "magenta +Y")]:
        image = reproject(
            torch.from_numpy(small)[None], [view], out_dtype=torch.uint8, layout="NHWC", backend="triton"
        )[0, 0].numpy()
        assert face_at(image, 16, 16) == centre
