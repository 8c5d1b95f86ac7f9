"""A thumbnail strip per panorama: its views as CLIP saw them, side by side, as one small JPEG.

The views are cut by the Engine's kernel, in the target's own view set and yaw offsets. They come from
the target itself when it holds them (an ingest run with ``--thumbnails SIZE``, or a results file
written with thumbnails: the views' ``thumbnail`` column), else from each panorama's source, decoded
again through the Engine's input stage. A panorama whose source is gone gets the reason instead.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

STRIP_QUALITY = 75
STRIP_HEIGHT = 64  # pixels: eight views of a strip are then ~20 KB, so 400 panoramas add ~8 MB to the page
DEFAULT_SIZE = 96  # pixels per view cut from the sources (a strip scales them to STRIP_HEIGHT)


def strip(jpegs: list[bytes], height: int = STRIP_HEIGHT) -> str:
    """Per-view JPEGs -> one data: URI of them side by side, each scaled to ``height`` (never up)."""
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    height = min(height, images[0].height)
    images = [im if im.height == height else im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS) for im in images]
    sheet = Image.new("RGB", (sum(im.width for im in images) + 2 * (len(images) - 1), height), "white")
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + 2
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=STRIP_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _view_parts(corpus) -> list[tuple[Path, list | None]]:
    from engine.ingest.run import committed_parts

    if corpus.kind == "run":
        return [(p, None) for p in committed_parts(corpus.target, "views")]
    return [(corpus.target, [("kind", "=", "view")])]


def stored(corpus, rows) -> dict[int, list[bytes]]:
    """The target's own per-view thumbnails for ``rows``: {row: [jpeg, ...]} (empty without the column)."""
    wanted = {corpus.ids[r]: r for r in rows}
    out: dict[int, dict[int, bytes]] = {}
    for part, row_filter in _view_parts(corpus):
        if "thumbnail" not in pq.read_schema(part).names:
            return {}
        table = pq.read_table(part, columns=["id", "view", "thumbnail"], filters=row_filter)
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(list(wanted), pa.string())))
        for item, view, jpeg in zip(*(table.column(c).to_pylist() for c in ("id", "view", "thumbnail")), strict=True):
            if jpeg:
                out.setdefault(wanted[item], {})[view] = jpeg
    return {r: [views[v] for v in sorted(views)] for r, views in out.items()}


def from_sources(engine, corpus, rows, size: int = DEFAULT_SIZE, progress=None) -> tuple[dict[int, list[bytes]], dict[int, str]]:
    """Per-view thumbnails cut by the Engine from each panorama's source: ({row: [jpeg, ...]}, {row: reason})."""
    from engine.decode import DecodeError
    from engine.pipeline import Panorama

    made, missing = {}, {}
    for r in rows:
        source = corpus.sources[r]
        if progress is not None:
            progress.update(1)
        if not source or ("#" in source and not Path(source).exists()):  # a tar member: read with the run, not here
            missing[r] = "no source file to cut thumbnails from" if not source else f"source {source} is inside a tar"
            continue
        if not Path(source).is_file():
            missing[r] = f"source missing: {source}"
            continue
        try:
            prepared = engine.prepare(Panorama(id=corpus.ids[r], data=os.fspath(source), yaw_offset=float(corpus.yaw_offsets[r])),
                                      thumbnails=size, host=True)
            pano = engine.decode(prepared).pixels
            made[r] = engine._thumbnails(np.asarray(pano), prepared)  # the Engine's own cut: same views, same kernel
        except (DecodeError, ValueError, OSError) as exc:
            missing[r] = f"cannot cut thumbnails from {source}: {exc}"
    return made, missing
