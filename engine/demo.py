"""A procedural street panorama: an honest synthetic sample for offline demonstrations and tests.

It is not a photograph and says so in its metadata. The camera stands 1.6 m above the middle of a
12 m wide street: paved ground, a row of facades with windows on each side, and sky above, ray-cast
per pixel into an equirectangular image in the engine's conventions (yaw 0 looks down the street).
"""

from __future__ import annotations

import numpy as np

SYNTHETIC_NOTE = "procedural street scene made by mimetic (synthetic, not a photograph)"
DEMO_THUMBNAILS = 96  # pixels per view of the thumbnails the demo keeps in its results, for its report
DEMO_QUERIES = ("a street with old buildings", "a modern glass building")


def demo_report(engine, out):
    """The demo's last step: ``mimetic report`` on its results, ``out/report/index.html`` (and report.json),
    read with the demo's own Engine. Returns the page's path."""
    from pathlib import Path

    from engine.analysis.report import INDEX, ReportOptions, build_report

    folder = Path(out) / "report"
    build_report(Path(out) / "results.parquet", folder, ReportOptions(queries=list(DEMO_QUERIES), top=3, sheet=3), engine=engine)
    return folder / INDEX


def street_scene(height: int = 1024, seed: int = 0) -> np.ndarray:
    """(height, 2 * height, 3) uint8 equirectangular panorama of a synthetic street."""
    rng = np.random.default_rng(seed)
    width = 2 * height
    lon = ((np.arange(width) + 0.5) / width - 0.5) * 2 * np.pi
    lat = (0.5 - (np.arange(height) + 0.5) / height) * np.pi
    lon, lat = np.meshgrid(lon, lat)
    ray_x, ray_y, ray_z = np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)

    image = np.empty((height, width, 3), dtype=np.float64)
    # Sky: a vertical gradient from pale at the horizon to deep blue overhead.
    t = np.clip(ray_y, 0, 1)[..., None]
    image[:] = (1 - t) * np.array([200, 215, 235]) + t * np.array([70, 120, 200])

    # Facades at x = +-6 m, 14 m tall, in 8 m wide buildings of varied colour, with windows.
    half_street, eye, roof = 6.0, 1.6, 14.0
    palette = rng.uniform(90, 230, size=(64, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = half_street / np.abs(ray_x)
        hit_y, hit_z = eye + distance * ray_y, distance * ray_z
    wall = (np.abs(ray_x) > 1e-6) & (hit_y >= 0) & (hit_y <= roof)
    building = (np.floor(hit_z / 8.0).astype(np.int64) + 32 + 17 * (ray_x > 0)) % 64
    colour = palette[np.where(wall, building, 0)]
    window = wall & (hit_y > 3.0) & ((hit_y % 3.0) > 1.0) & ((hit_y % 3.0) < 2.4) & ((np.abs(hit_z) % 2.5) > 1.2)
    colour = np.where(window[..., None], colour * 0.35, colour)
    image = np.where(wall[..., None], colour, image)

    # Ground: paving stones, a 0.5 m grid with dark joints.
    with np.errstate(divide="ignore", invalid="ignore"):
        to_ground = eye / -ray_y
        ground_x, ground_z = to_ground * ray_x, to_ground * ray_z
    ground = (ray_y < 0) & ~wall
    joints = ((ground_x % 0.5) < 0.04) | ((ground_z % 0.5) < 0.04)
    stone = np.where(joints, 70.0, 150.0)[..., None] * np.array([1.0, 0.97, 0.9])
    image = np.where(ground[..., None], stone, image)
    return np.clip(image, 0, 255).astype(np.uint8)
