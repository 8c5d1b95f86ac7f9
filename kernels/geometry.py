"""View geometry shared by every backend: the view spec, the camera rotation and the output affine.

Conventions (py360convert's, see ``DESIGN.md``):

* Angles are degrees here and radians inside kernels.
* yaw 0 looks at the centre column of the panorama, positive yaw turns right, positive pitch looks
  up, positive roll turns the camera clockwise about its line of sight (the scene turns
  counter-clockwise), as py360convert's ``in_rot_deg``.
* ``fov`` is horizontal and measured edge to edge (pinhole). The vertical half-angle follows from the
  aspect through tan: ``tan(vfov/2) = tan(fov/2) * height / width``.
* Pixel centres sit at +0.5, in the view and in the panorama.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.uint8)
LAYOUTS = ("NCHW", "NHWC")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


@dataclass(frozen=True)
class ViewSpec:
    """One perspective view of a panorama: direction in degrees, size in pixels."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    fov: float = 90.0
    width: int = 224
    height: int = 224

    def __post_init__(self):
        for name in ("yaw", "pitch", "roll", "fov"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not _finite(value):
                raise ValueError(f"ViewSpec.{name} must be a finite number of degrees, got {value!r}")
        if not 0.0 < self.fov < 180.0:
            raise ValueError(f"ViewSpec.fov must be in (0, 180) degrees, got {self.fov!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViewSpec.{name} must be a positive int of pixels, got {value!r}")


def wrap_degrees(angle):
    """An angle, or an array of them, reduced to [-180, 180) degrees exactly, in float64.

    Every finite angle is a direction: 1e300 degrees is fmod(1e300, 360) degrees. fmod is exact in
    float64, and so is the one step into [-180, 180) (Sterbenz), whereas radians(1e300) or a float32
    sum of such angles keeps nothing of the direction. The kernels get angles of at most pi radians,
    so a yaw plus a yaw offset stays small in float32 too. The caller's ViewSpec keeps its own value.
    """
    wrapped = np.fmod(np.asarray(angle, dtype=np.float64), 360.0)
    wrapped = np.where(wrapped >= 180.0, wrapped - 360.0, np.where(wrapped < -180.0, wrapped + 360.0, wrapped))
    return float(wrapped) if wrapped.ndim == 0 else wrapped


def _axis_rotation(radians: float, axis: int) -> np.ndarray:
    """Right-handed rotation matrix about a coordinate axis (x=0, y=1, z=2)."""
    c, s = math.cos(radians), math.sin(radians)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def camera_to_world(view: ViewSpec) -> np.ndarray:
    """(3, 3) float64 matrix taking a camera ray (x right, y up, z forward) to the world.

    Roll about the line of sight, then pitch, then yaw about the world's vertical axis. Because yaw
    is outermost, a per-panorama yaw offset is a pure shift in longitude, which is how the kernels
    apply ``yaw_offsets``.
    """
    yaw, pitch, roll = (math.radians(wrap_degrees(a)) for a in (view.yaw, view.pitch, view.roll))
    return _axis_rotation(yaw, 1) @ _axis_rotation(-pitch, 0) @ _axis_rotation(-roll, 2)


def view_params(views: Sequence[ViewSpec]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-view kernel parameters, with yaw factored out as a pure longitude shift.

    Returns ``(shapes, shape_index, yaw)``: ``shapes`` is (U, 11) float64 for the U distinct
    (pitch, roll, fov, size) combinations, each the yaw-free rotation row-major then tan(hfov/2)
    and tan(vfov/2); ``shape_index`` (N,) int64 maps view n to its row; ``yaw`` (N,) is radians. A
    ring of eight yaws thus shares one projection, which the CPU kernel computes once. Angles are
    reduced first (``wrap_degrees``): |yaw| <= pi, and pitch 370 shares pitch 10's row.
    """
    keys: dict[tuple, int] = {}
    rows, shape_index = [], []
    for view in views:
        key = (wrap_degrees(view.pitch), wrap_degrees(view.roll), view.fov, view.width, view.height)
        if key not in keys:
            keys[key] = len(rows)
            tan_x = math.tan(math.radians(view.fov) / 2)
            tan_y = tan_x * view.height / view.width
            rotation = camera_to_world(ViewSpec(0.0, view.pitch, view.roll, view.fov, view.width, view.height))
            rows.append([*rotation.ravel(), tan_x, tan_y])
        shape_index.append(keys[key])
    yaw = np.radians(wrap_degrees([view.yaw for view in views]))
    return np.asarray(rows, dtype=np.float64), np.asarray(shape_index, dtype=np.int64), yaw


def output_affine(normalize, out_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, bias) applied to a filtered value v in [0, 255]: out = v * scale + bias.

    ``None`` gives [0, 1] (0-255 for uint8), ``"clip"`` OpenAI CLIP's mean/std, ``"sd"`` [-1, 1],
    and a ``(mean, std)`` pair normalises [0, 1] values with that mean and std.
    """
    if out_dtype == torch.uint8:
        if normalize is not None:
            raise ValueError(f"normalize={normalize!r} needs a float out_dtype, not uint8")
        return np.ones(3), np.zeros(3)
    if normalize is None:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif isinstance(normalize, str):
        presets = {"clip": (CLIP_MEAN, CLIP_STD), "sd": ((0.5,) * 3, (0.5,) * 3)}
        if normalize not in presets:
            raise ValueError(f"normalize must be None, 'clip', 'sd' or (mean, std), got {normalize!r}")
        mean, std = presets[normalize]
    else:
        try:
            mean, std = (np.broadcast_to(np.asarray(v, dtype=np.float64), (3,)) for v in normalize)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"normalize must be None, 'clip', 'sd' or (mean, std), got {normalize!r}") from exc
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ValueError(f"normalize mean must be finite and std positive, got mean={mean}, std={std}")
    return 1.0 / (255.0 * std), -mean / std


def py360convert_fov(fov: float, pixels: int) -> float:
    """The fov py360convert needs for our edge-to-edge ``fov``: it measures between edge pixel centres."""
    return math.degrees(2 * math.atan(math.tan(math.radians(fov) / 2) * (pixels - 1) / pixels))
