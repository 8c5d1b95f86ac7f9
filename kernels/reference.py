"""Float64 NumPy reference of the reprojection: slow, obvious, and the yardstick for the tests.

It follows the same mathematics as the kernels (see ``kernels/__init__.py``) but derives each output
pixel's footprint by central finite differences of the projection instead of the kernels' analytic
Jacobian, so the two derivations check each other.
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import ViewSpec, camera_to_world, wrap_degrees


def project(view: ViewSpec, rows, cols, yaw_offset: float, pano_h: int, pano_w: int):
    """Continuous panorama coordinates (X, Y) of view points (rows, cols), in pixels from the top-left.

    Pixel c of the panorama covers [c, c + 1), so its centre is c + 0.5. Angles count by their exact
    remainder mod 360 (``camera_to_world`` reduces the view's own).
    """
    tan_x = math.tan(math.radians(view.fov) / 2)
    tan_y = tan_x * view.height / view.width
    x = ((cols + 0.5) * 2.0 / view.width - 1.0) * tan_x
    y = (1.0 - (rows + 0.5) * 2.0 / view.height) * tan_y
    ray = np.stack([x, y, np.ones_like(x)], axis=-1) @ camera_to_world(view).T
    lon = np.arctan2(ray[..., 0], ray[..., 2]) + math.radians(wrap_degrees(yaw_offset))
    lat = np.arctan2(ray[..., 1], np.hypot(ray[..., 0], ray[..., 2]))
    return (lon / (2 * math.pi) + 0.5) * pano_w, (0.5 - lat / math.pi) * pano_h


def tent_cdf(u):
    """Integral of the unit-half-width tent (triangle) filter from -1 to u."""
    u = np.clip(u, -1.0, 1.0)
    return np.where(u <= 0.0, 0.5 * (1.0 + u) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


def bilinear_weights(center: float) -> tuple[int, np.ndarray]:
    """First pixel index and the two linear-interpolation weights along one axis (centres at +0.5)."""
    first = math.floor(center - 0.5)
    frac = center - 0.5 - first
    return first, np.array([1.0 - frac, frac])


def tent_weights(center: float, footprint: float) -> tuple[int, np.ndarray]:
    """First pixel index and weights of a tent of half-width footprint/sqrt(2), integrated per pixel.

    Its variance (with the pixel's own box) equals bilinear's at footprint 1 and grows with it.
    """
    half = footprint / math.sqrt(2.0)
    first, end = math.floor(center - half), math.ceil(center + half)
    edges = np.arange(first, end + 1, dtype=np.float64)
    return first, np.diff(tent_cdf((edges - center) / half))


def filter_at(pano: np.ndarray, x: float, y: float, footprint_x: float, footprint_y: float) -> np.ndarray:
    """Filter the piecewise-constant panorama at (x, y): bilinear, or a tent over a wider footprint."""
    pano_h, pano_w = pano.shape[:2]
    if footprint_x <= 1.0 and footprint_y <= 1.0:
        (first_col, col_w), (first_row, row_w) = bilinear_weights(x), bilinear_weights(y)
    else:
        (first_col, col_w), (first_row, row_w) = tent_weights(x, footprint_x), tent_weights(y, footprint_y)
    value = np.zeros(3)
    for dr, wr in enumerate(row_w):
        row, shift = first_row + dr, 0
        if row < 0:  # over the north pole: the same latitude on the opposite meridian
            row, shift = -1 - row, pano_w // 2
        elif row >= pano_h:
            row, shift = 2 * pano_h - 1 - row, pano_w // 2
        cols = (first_col + np.arange(len(col_w)) + shift) % pano_w
        value += wr * (col_w @ pano[row, cols].astype(np.float64))
    return value


def reproject_reference(pano: np.ndarray, views: list[ViewSpec], antialias: bool = True, yaw_offset: float = 0.0):
    """One uint8 (H, W, 3) panorama -> float64 (N, 3, h, w) views with values in [0, 255]."""
    pano_h, pano_w = pano.shape[:2]
    out = []
    for view in views:
        h, w = view.height, view.width
        rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

        def at(dr, dc, view=view, rows=rows, cols=cols):
            return project(view, rows + dr, cols + dc, yaw_offset, pano_h, pano_w)

        x, y = at(0.0, 0.0)
        footprint_x, footprint_y = np.ones_like(x), np.ones_like(y)
        if antialias:
            eps = 1e-4
            (xr1, yr1), (xr0, yr0) = at(eps, 0.0), at(-eps, 0.0)
            (xc1, yc1), (xc0, yc0) = at(0.0, eps), at(0.0, -eps)
            # Longitude differences wrap: take the short way round.
            dx_dr = (np.mod(xr1 - xr0 + pano_w / 2, pano_w) - pano_w / 2) / (2 * eps)
            dx_dc = (np.mod(xc1 - xc0 + pano_w / 2, pano_w) - pano_w / 2) / (2 * eps)
            dy_dr, dy_dc = (yr1 - yr0) / (2 * eps), (yc1 - yc0) / (2 * eps)
            # Footprint widths: root-sum-square of the pixel's edge vectors along each axis, capped
            # so the tent spans at most the whole panorama.
            footprint_x = np.clip(np.hypot(dx_dr, dx_dc), 1.0, pano_w / math.sqrt(2.0))
            footprint_y = np.clip(np.hypot(dy_dr, dy_dc), 1.0, pano_h / math.sqrt(2.0))
        view_out = np.empty((3, h, w))
        for i in range(h):
            for j in range(w):
                view_out[:, i, j] = filter_at(pano, x[i, j], y[i, j], footprint_x[i, j], footprint_y[i, j])
        out.append(view_out)
    return np.stack(out)
