"""The one results schema: Arrow columns for a view row and a panorama row, wherever they are written.

``mimetic embed`` and ``mimetic demo`` write one Parquet file of EmbedResults: a row per view
(``kind`` "view"), a pooled row per panorama ("pooled") and a row per failure ("error", with its
message: nothing accepted is dropped silently). An ingest run writes the same view and panorama
columns into its ``views`` and ``panoramas`` tables (``engine.ingest.tables``), with the city's
columns (lat, lon, bearing, ...) beside them. The columns are typed, so any Arrow tool reads them
without this package: embeddings as fp16 lists, labels as
``list<struct<vocabulary, label, probability>>`` (the top-k of each vocabulary), metadata as JSON
text (it is whatever the caller gave). The file's schema metadata (key ``mimetic``) holds the
EngineConfig that wrote it, so ``mimetic query results.parquet TEXT`` embeds text with the same model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LABEL = pa.struct([("vocabulary", pa.string()), ("label", pa.string()), ("probability", pa.float32())])
EMBEDDING = pa.list_(pa.float16())
LABELS = pa.list_(LABEL)

# A view row: which view of which panorama, and what the model saw in it.
VIEW_FIELDS = [
    pa.field("id", pa.string()),  # the panorama's id
    pa.field("view", pa.int32()),  # index in the view set
    pa.field("yaw", pa.float32()),
    pa.field("pitch", pa.float32()),
    pa.field("roll", pa.float32()),
    pa.field("fov", pa.float32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("embedding", EMBEDDING),  # L2-normalised, fp16
    pa.field("labels", LABELS),  # top-k per vocabulary, for this view
    pa.field("thumbnail", pa.binary()),  # the view as a small JPEG, when asked for (ingest --thumbnails); else null
]
# A panorama row: its pooled embedding and labels, and its metadata as given.
PANORAMA_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("embedding", EMBEDDING),  # the L2-normalised mean of the view embeddings, fp16
    pa.field("labels", LABELS),  # top-k per vocabulary, pooled
    pa.field("meta", pa.string()),  # JSON, echoed from the input
]

# The results file of `mimetic embed`: both kinds of row in one table, told apart by ``kind``.
SCHEMA = pa.schema(
    [
        VIEW_FIELDS[0],
        pa.field("kind", pa.string()),  # "view", "pooled" or "error"
        *VIEW_FIELDS[1:],  # null on pooled and error rows, except embedding and labels on pooled rows
        PANORAMA_FIELDS[-1],  # meta
        pa.field("error", pa.string()),
    ]
)
KINDS = {"views": "view", "panoramas": "pooled"}  # which rows of a results file hold each table's rows
METADATA_KEY = b"mimetic"


def label_lists(rows: list[dict]) -> pa.Array:
    """[{vocabulary: [(label, p), ...]}] -> list<struct<vocabulary, label, probability>>; None -> a null row."""
    offsets, vocabularies, labels, probabilities, valid = [0], [], [], [], []
    for row in rows:
        for name, pairs in (row or {}).items():
            for label, p in pairs:
                vocabularies.append(name)
                labels.append(label)
                probabilities.append(p)
        offsets.append(len(labels))
        valid.append(row is not None)
    values = pa.StructArray.from_arrays(
        [pa.array(vocabularies, pa.string()), pa.array(labels, pa.string()), pa.array(probabilities, pa.float32())],
        fields=list(LABEL),
    )
    mask = None if all(valid) else pa.array([not v for v in valid])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)


def embedding_lists(matrix: np.ndarray) -> pa.Array:
    """(N, D) -> list<float16>, one list per row, without a Python loop."""
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * dim)  # dim is 0 when every input failed
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.astype(np.float16).reshape(-1), pa.float16()))


def read_labels(value: list[dict] | None) -> dict[str, list[tuple[str, float]]]:
    """A ``labels`` cell (as pyarrow's to_pylist gives it) -> {vocabulary: [(label, probability), ...]}."""
    out: dict[str, list[tuple[str, float]]] = {}
    for entry in value or []:
        out.setdefault(entry["vocabulary"], []).append((entry["label"], entry["probability"]))
    return out


def rows_table(rows: list[dict], labels: list[dict | None], embeddings: list, *, schema: pa.Schema = SCHEMA,
               engine_config=None, table: str = "results") -> pa.Table:
    """Rows of ``schema``'s plain columns (a dict each; a column left out is null), with each row's labels and
    embedding (None: null) -> a table of ``schema``; ``engine_config`` (a dataclass or a dict) goes into its
    metadata, under ``table``: what ``read_engine_config`` reads back."""
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    columns["labels"] = label_lists(labels)
    columns["embedding"] = pa.array(embeddings, EMBEDDING)
    arrays = [c if isinstance(c, pa.Array) else pa.array(c, f.type) for f, c in ((f, columns[f.name]) for f in schema)]
    metadata = None
    if engine_config is not None:
        config = dataclasses.asdict(engine_config) if dataclasses.is_dataclass(engine_config) else dict(engine_config)
        metadata = {METADATA_KEY: json.dumps({"table": table, "engine_config": config}, default=str)}
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(metadata))


def results_table(results, engine_config=None) -> pa.Table:
    """EmbedResults -> the results table (``SCHEMA``); ``engine_config`` goes into the schema metadata."""
    rows: list[dict] = []
    labels: list[dict | None] = []
    embeddings: list = []
    add = lambda **row: rows.append(row)  # noqa: E731

    for result in results:
        meta = json.dumps(result.meta, default=str)
        if result.error is not None:
            add(id=result.id, kind="error", meta=meta, error=result.error)
            labels.append(None)
            embeddings.append(None)
            continue
        for index, (view, embedding) in enumerate(zip(result.views, result.embeddings.float().numpy(), strict=True)):
            add(id=result.id, kind="view", view=index, yaw=view.yaw, pitch=view.pitch, roll=view.roll, fov=view.fov,
                width=view.width, height=view.height, meta=meta,
                thumbnail=result.thumbnails[index] if result.thumbnails else None)
            labels.append({name: r["views"][index] for name, r in result.readings.items()})
            embeddings.append(embedding.astype(np.float16))
        add(id=result.id, kind="pooled", meta=meta)
        labels.append({name: r["pooled"] for name, r in result.readings.items()})
        embeddings.append(result.pooled.float().numpy().astype(np.float16))
    return rows_table(rows, labels, embeddings, engine_config=engine_config)


def read_engine_config(path: str | os.PathLike) -> dict:
    """The EngineConfig (as a dict) that wrote a results file; a clear error for a file without one."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:  # not Parquet at all, or unreadable
        raise ValueError(f"{path}: not a Parquet file ({exc})") from None
    try:
        return json.loads(metadata[METADATA_KEY])["engine_config"]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path}: not a mimetic results file (no engine configuration in its metadata); "
                         "write it with `mimetic embed` or `mimetic demo`, or pass an ingest run folder") from None


def write_parquet(results, path: str | os.PathLike, engine_config=None) -> Path:
    """Write the results table atomically: a temporary name in the same folder, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(results_table(results, engine_config), tmp)
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
