"""EmbedResults -> an Arrow table (one row per view and one pooled row per panorama) and Parquet.

Embeddings are stored as fp16 lists, readings and metadata as JSON text, so any Arrow tool reads
the file without this package. A failed panorama keeps a row with its error: nothing accepted is
dropped silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),  # "view", "pooled" or "error"
        ("view", pa.int32()),  # index in the view set; null for pooled and error rows
        ("yaw", pa.float32()),
        ("pitch", pa.float32()),
        ("roll", pa.float32()),
        ("fov", pa.float32()),
        ("embedding", pa.list_(pa.float16())),
        ("readings", pa.string()),  # JSON: {vocabulary: [[label, probability], ...]}
        ("meta", pa.string()),  # JSON, echoed from the input
        ("error", pa.string()),
    ]
)


def results_table(results) -> pa.Table:
    rows = []
    for result in results:
        meta = json.dumps(result.meta, default=str)
        if result.error is not None:
            rows.append({"id": result.id, "kind": "error", "meta": meta, "error": result.error})
            continue
        embeddings = result.embeddings.float().numpy().astype(np.float16)
        for index, (view, embedding) in enumerate(zip(result.views, embeddings, strict=True)):
            readings = {name: r["views"][index] for name, r in result.readings.items()}
            rows.append(
                {
                    "id": result.id, "kind": "view", "view": index, "yaw": view.yaw, "pitch": view.pitch,
                    "roll": view.roll, "fov": view.fov, "embedding": embedding, "readings": json.dumps(readings),
                    "meta": meta,
                }
            )
        pooled_readings = {name: r["pooled"] for name, r in result.readings.items()}
        rows.append(
            {
                "id": result.id, "kind": "pooled", "embedding": result.pooled.float().numpy().astype(np.float16),
                "readings": json.dumps(pooled_readings), "meta": meta,
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_parquet(results, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary name in the same folder, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(results_table(results), tmp)
    os.replace(tmp, path)
    return path


def file_stems(ids) -> list[str]:
    """A file-name stem per id (a path's stem, or the id made safe); repeats get -2, -3, ..."""
    used, stems = set(), []
    for item in ids:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(item)).stem) or "item"
        stem, count = base, 1
        while stem in used:
            count += 1
            stem = f"{base}-{count}"
        used.add(stem)
        stems.append(stem)
    return stems


# -- CSV ---------------------------------------------------------------------------------------------

# A text cell that starts with one of these is run as a formula by Excel, LibreOffice and Sheets
# (OWASP's "CSV injection"): "=HYPERLINK(...)", "@SUM(...)", "+1+1", "-2+3", a tab or a CR.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A CSV cell that no spreadsheet runs: text starting with = + - @, tab or CR gets a leading ``'``.

    Numbers (int, float, numpy scalars) stay numbers, so a negative value is still -0.25 and not
    text; None stays an empty cell. OWASP's advice, applied to every text cell the project writes.
    """
    if value is None or isinstance(value, (bool, int, float, np.integer, np.floating)):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def write_csv(path: str | os.PathLike, rows, fieldnames) -> Path:
    """Rows (dicts) to a spreadsheet-safe CSV, atomically (a temporary name, renamed when complete)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(fieldnames), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: spreadsheet_safe(value) for key, value in row.items()})
    os.replace(tmp, path)
    return path
