"""View-set presets: their exact directions, ``view_set``'s inputs and errors, and what they show on axes.png."""

import numpy as np
import pytest
import torch

from engine.decode import decode_image
from engine.views import PRESETS, cube6, gsv6, ring4, ring8, view_set
from kernels import ViewSpec, reproject


def directions(views):
    return [(v.yaw, v.pitch) for v in views]


def test_ring8_is_eight_yaws_45_degrees_apart():
    views = ring8()
    assert directions(views) == [(float(yaw), 0.0) for yaw in range(0, 360, 45)]
    assert all(v.fov == 90 and v.roll == 0 and (v.width, v.height) == (224, 224) for v in views)


def test_ring4_is_four_yaws_90_degrees_apart():
    assert directions(ring4()) == [(0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (270.0, 0.0)]


@pytest.mark.parametrize("preset", [cube6, gsv6])
def test_six_view_presets_are_four_headings_then_up_and_down(preset):
    views = preset(64)
    assert directions(views) == [(0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (270.0, 0.0), (0.0, 90.0), (0.0, -90.0)]
    assert all(v.fov == 90 and (v.width, v.height) == (64, 64) for v in views)


# Each preset's (yaw, pitch) list, written out by hand: what a researcher's record of "ring8" means.
PRESET_DIRECTIONS = {
    "ring8": [(0, 0), (45, 0), (90, 0), (135, 0), (180, 0), (225, 0), (270, 0), (315, 0)],
    "ring4": [(0, 0), (90, 0), (180, 0), (270, 0)],
    "cube6": [(0, 0), (90, 0), (180, 0), (270, 0), (0, 90), (0, -90)],
    "gsv6": [(0, 0), (90, 0), (180, 0), (270, 0), (0, 90), (0, -90)],
}


def test_view_set_by_name_gives_each_presets_directions_at_the_size_asked():
    assert sorted(PRESETS) == sorted(PRESET_DIRECTIONS)
    for name, expected in PRESET_DIRECTIONS.items():
        views = view_set(name, size=96)
        assert directions(views) == [(float(yaw), float(pitch)) for yaw, pitch in expected], name
        assert all((v.width, v.height, v.fov, v.roll) == (96, 96, 90.0, 0.0) for v in views), name
    assert {(v.width, v.height) for v in view_set("ring8")} == {(224, 224)}  # the default size


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown view set 'ring9'") as info:
        view_set("ring9")
    for name in ("ring8", "ring4", "cube6", "gsv6"):
        assert name in str(info.value)


def test_view_set_from_a_list_of_viewspecs_and_dicts():
    views = view_set([ViewSpec(yaw=-30, width=50, height=50), {"yaw": 30, "pitch": 10}, {"fov": 60, "width": 80}], size=50)
    assert views[0] == ViewSpec(yaw=-30, width=50, height=50)  # a ViewSpec is taken as given
    assert views[1] == ViewSpec(yaw=30, pitch=10, width=50, height=50)  # a dict's size defaults to `size`
    assert views[2] == ViewSpec(fov=60, width=80, height=50)


def test_fov_override_applies_to_every_view():
    assert {v.fov for v in view_set("cube6", fov=100)} == {100}
    with pytest.raises(ValueError, match="fov"):
        view_set("ring8", fov=180)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ([], "empty"),
        ([{"yaw": 0, "heading": 90}], r"view 0: unknown field\(s\) \['heading'\]"),
        ([{"yaw": 0}, {"pitch": float("nan")}], "view 1: ViewSpec.pitch"),
        ([{"yaw": 0}, (0, 0)], "view 1: expected a ViewSpec or a dict"),
        (42, "preset name"),
    ],
)
def test_view_set_rejects_bad_lists(arg, message):
    with pytest.raises(ValueError, match=message):
        view_set(arg)


@pytest.mark.parametrize("size", [0, -5, 2.5, True])
def test_view_set_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="size"):
        view_set("ring4", size=size)


def test_gsv6_on_axes_png_shows_each_labelled_face(panoramas_dir):
    """Real input: per SOURCES.md, heading 0 shows +Z on red, 90 +X on green, 270 (-90) -X on yellow,
    up +Y on magenta and down the cyan floor; heading 180 is the blue -Z face."""
    pano = torch.from_numpy(decode_image(panoramas_dir / "axes.png"))
    out = reproject([pano], gsv6(64), out_dtype=torch.uint8, layout="NHWC")[0].numpy()
    centres = out[:, 16:48, 16:48].reshape(6, -1, 3).astype(int)
    r, g, b = centres[..., 0], centres[..., 1], centres[..., 2]
    checks = {
        "red (yaw 0)": (r > 200) & (g < 80) & (b < 80),
        "green (yaw 90)": (g > 200) & (r < 170) & (b < 80),
        "blue (yaw 180)": (b > 200) & (r < 80) & (g < 80),
        "yellow (yaw 270)": (r > 200) & (g > 200) & (b < 80),
        "magenta (up)": (r > 180) & (b > 200) & (g < 120),
        "cyan (down)": (g > 200) & (b > 200) & (r < 80),
    }
    for index, (what, mask) in enumerate(checks.items()):
        share = np.mean(mask[index])
        assert share > 0.6, f"view {index} should be mostly {what}, only {share:.0%} is"


def test_write_views_writes_each_view_and_a_manifest_and_goes_on_past_a_bad_file(panoramas_dir, tmp_path):
    import json

    from PIL import Image

    from engine.views import write_views

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    seen = []
    manifest = write_views([str(broken), str(panoramas_dir / "axes.png")], tmp_path / "out", views="ring4", size=32, report=seen.append)
    assert [entry["source"] for entry in seen] == [str(broken), str(panoramas_dir / "axes.png")]  # as each is done
    assert manifest == json.loads((tmp_path / "out" / "views.json").read_text())
    [failed] = manifest["failed"]
    assert failed["source"] == str(broken) and failed["error"]
    [done] = manifest["panoramas"]
    assert done["files"] == ["axes_0_y0_p0.png", "axes_1_y90_p0.png", "axes_2_y180_p0.png", "axes_3_y270_p0.png"]
    # Each file is that view, cut from the decoded panorama by the kernel.
    expected = reproject([torch.from_numpy(decode_image(panoramas_dir / "axes.png"))], ring4(32), out_dtype=torch.uint8, layout="NHWC")[0]
    for name, view in zip(done["files"], expected.numpy(), strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)), view)
    assert [(v["yaw"], v["pitch"], v["width"]) for v in manifest["views"]] == [(0, 0, 32), (90, 0, 32), (180, 0, 32), (270, 0, 32)]
    with pytest.raises(ValueError, match="--no-antialias"):  # a setting is checked before any file is read
        write_views([str(broken)], tmp_path / "none", backend="torch")
    assert not (tmp_path / "none").exists()
