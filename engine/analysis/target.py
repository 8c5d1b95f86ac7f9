"""What a report reads: a target (an ingest run folder, a results file, a dream folder) as one ``Corpus``.

    corpus = load_target("runs/rome", metadata=["ages.csv"])
    corpus.ids, corpus.pooled, corpus.lat, corpus.meta

A run folder's committed panoramas (``engine.ingest.read_run``), or a results file's pooled rows, become
one row each: id, source, lat/lon (NaN where unknown), the metadata as a dict, the pooled embedding
(float32, unit length) and the stored top labels. ``--metadata`` files are joined here, by id, file name
or stem through the same columns ingest reads (``engine.ingest.inputs.ID_COLUMNS``); a later file adds
or replaces columns, and lat/lon are read from the joined metadata where the target had none.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.ingest.inputs import InputError, _metadata_index, canonical_fields, read_metadata
from engine.ingest.run import RunFolder, committed_parts
from engine.results import KINDS, read_engine_config, read_labels

DREAMS_RECORD = "dreams.json"


class ReportError(ValueError):
    """A target, a column or a metadata file a report cannot use; the message says why (one line)."""


@dataclasses.dataclass
class Corpus:
    """One row per panorama that was embedded (failures are counted, not kept)."""

    target: Path
    kind: str  # "run" or "results"
    config: dict  # the EngineConfig that wrote it
    ids: list[str]
    sources: list[str | None]
    yaw_offsets: np.ndarray  # (N,) degrees, as the panoramas were cut
    lat: np.ndarray  # (N,) float64, NaN where unknown
    lon: np.ndarray
    meta: list[dict]
    pooled: np.ndarray  # (N, D) float32
    labels: list[dict]  # stored top-k per vocabulary: {vocabulary: [(label, p), ...]}
    failed: int = 0  # inputs that failed (quarantine or error rows): counted in the report
    metadata_files: list[str] = dataclasses.field(default_factory=list)
    metadata_matched: int = 0  # panoramas that got a row from --metadata

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_coordinates(self) -> bool:
        return bool(np.isfinite(self.lat).any())


def target_kind(target: str | os.PathLike) -> str:
    """"dreams", "run" or "results"; a ReportError for anything else."""
    path = Path(target)
    if path.is_dir() and (path / DREAMS_RECORD).is_file():
        return "dreams"
    if path.is_dir() and (path / "manifest.json").is_file():
        return "run"
    if path.is_file():
        return "results"
    if path.is_dir():
        raise ReportError(f"{path}: not an ingest run folder (no manifest.json) nor a dream folder (no {DREAMS_RECORD})")
    raise ReportError(f"{path}: no such run folder, results file or dream folder")


def _matrix(column) -> np.ndarray:
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(lists) == 0:
        return np.zeros((0, 0), np.float32)
    return lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(lists), -1)


def load_target(target: str | os.PathLike, metadata=()) -> Corpus:
    """The panoramas of a run folder or a results file, with ``metadata`` files joined."""
    path = Path(target)
    try:
        corpus = _load_run(path) if target_kind(path) == "run" else _load_results(path)
    except InputError as exc:  # a damaged manifest, a part missing: the run folder's own one-line errors
        raise ReportError(str(exc)) from None
    for file in metadata:
        _join(corpus, file)
    return corpus


def _load_run(path: Path) -> Corpus:
    manifest = RunFolder(path).load_manifest()
    columns = ["id", "source", "lat", "lon", "meta", "yaw_offset", "embedding", "labels"]
    parts = committed_parts(path, "panoramas")
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in parts]) if parts else None
    failed = sum(entry.get("quarantined", 0) for entry in manifest["shards"].values())
    if table is None:
        return Corpus(path, "run", manifest["engine_config"], [], [], np.zeros(0), np.zeros(0), np.zeros(0), [],
                      np.zeros((0, 0), np.float32), [], failed)
    data = table.drop_columns(["embedding", "labels"]).to_pydict()

    def floats(name):
        return np.array([np.nan if v is None else v for v in data[name]], np.float64)

    return Corpus(
        target=path, kind="run", config=manifest["engine_config"], ids=data["id"], sources=data["source"],
        yaw_offsets=np.nan_to_num(floats("yaw_offset")), lat=floats("lat"), lon=floats("lon"),
        meta=[json.loads(m) if m else {} for m in data["meta"]], pooled=_matrix(table.column("embedding")),
        labels=[read_labels(v) for v in table.column("labels").to_pylist()], failed=failed,
    )


def _load_results(path: Path) -> Corpus:
    config = read_engine_config(path)  # a ValueError that says what the file is not
    table = pq.read_table(path, columns=["id", "kind", "embedding", "labels", "meta"])
    failed = pc.sum(pc.equal(table.column("kind"), "error")).as_py() or 0
    table = table.filter(pc.equal(table.column("kind"), KINDS["panoramas"]))
    ids = table.column("id").to_pylist()
    meta = [json.loads(m) if m else {} for m in table.column("meta").to_pylist()]
    fields = [canonical_fields(m) for m in meta]
    # `mimetic embed` names each panorama by the path it was given: its source (relative to where it ran, or
    # to the results file). An id that is no image path (an array's, the demo's synthetic scene) has none.
    sources = [_source(i, path.parent) for i in ids]
    return Corpus(
        target=path, kind="results", config=config, ids=ids, sources=sources, yaw_offsets=np.zeros(len(ids)),
        lat=np.array([np.nan if f["lat"] is None else f["lat"] for f in fields], np.float64),
        lon=np.array([np.nan if f["lon"] is None else f["lon"] for f in fields], np.float64),
        meta=meta, pooled=_matrix(table.column("embedding")),
        labels=[read_labels(v) for v in table.column("labels").to_pylist()], failed=failed,
    )


def _source(name: str, beside: Path) -> str | None:
    from engine.ingest.inputs import IMAGE_EXTENSIONS

    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return None
    return name if Path(name).is_file() or not (beside / name).is_file() else os.fspath(beside / name)


def _join(corpus: Corpus, file) -> None:
    """Add a metadata file's columns to the panoramas it names (the first row naming one wins)."""
    try:
        rows = read_metadata(file)
    except InputError as exc:
        raise ReportError(str(exc)) from None
    index = _metadata_index(rows)
    matched = 0
    for k, (item_id, source) in enumerate(zip(corpus.ids, corpus.sources, strict=True)):
        name = Path(source).name if source else Path(item_id).name
        keys = (item_id, item_id.rsplit("/", 1)[-1], name, name.rsplit(".", 1)[0])
        row = next((index[key][1] for key in keys if key in index), None)
        if row is None:
            continue
        matched += 1
        corpus.meta[k] = {**corpus.meta[k], **row}
        if not np.isfinite(corpus.lat[k]) or not np.isfinite(corpus.lon[k]):
            fields = canonical_fields(corpus.meta[k])
            if fields["lat"] is not None and fields["lon"] is not None:
                corpus.lat[k], corpus.lon[k] = fields["lat"], fields["lon"]
    corpus.metadata_files.append(os.fspath(file))
    corpus.metadata_matched = max(corpus.metadata_matched, matched)


def column_values(corpus: Corpus, column: str) -> tuple[np.ndarray, dict]:
    """Each panorama's number in ``column`` (NaN where it has none) and the counts of what was left out.

    ``column`` is a metadata column, or lat/lon. A blank cell is missing; a cell that is not a number
    ("unknown") is left out and counted apart. A column no panorama has, or one without a single
    number, is a ReportError that lists what there is.
    """
    from engine.ingest.inputs import finite_number

    values = np.full(len(corpus), np.nan)
    missing = not_numeric = 0
    example = None
    present = False
    for k, meta in enumerate(corpus.meta):
        cell = meta.get(column)
        if column in ("lat", "lon") and cell is None:
            cell = (corpus.lat if column == "lat" else corpus.lon)[k]
            cell = None if not np.isfinite(cell) else float(cell)
        if column in meta or cell is not None:
            present = True
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            missing += 1
            continue
        number = finite_number(cell)
        if number is None:
            not_numeric += 1
            example = example or (corpus.ids[k], cell)
            continue
        values[k] = number
    if len(corpus) and not present:
        known = sorted({key for meta in corpus.meta for key in meta})
        raise ReportError(f"--against {column}: no panorama has a column {column!r}; columns: "
                          f"{', '.join(known[:40]) or 'none'} (add one with --metadata FILE)")
    if len(corpus) and not_numeric and not np.isfinite(values).any():
        raise ReportError(f"--against {column}: the column is not numeric (e.g. {example[1]!r} for {example[0]})")
    return values, {"missing": missing, "not_numeric": not_numeric}


def view_embeddings(corpus: Corpus, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The view embeddings of the panoramas ``rows``: (panorama row per view, view index, (M, D) float32)."""
    wanted = {corpus.ids[r]: r for r in rows}
    if corpus.kind == "run":
        parts = [(p, None) for p in committed_parts(corpus.target, "views")]
    else:
        parts = [(corpus.target, [("kind", "=", KINDS["views"])])]
    owners, index, matrices = [], [], []
    for part, row_filter in parts:
        table = pq.read_table(part, columns=["id", "view", "embedding"], filters=row_filter)
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(list(wanted), pa.string())))
        owners += [wanted[i] for i in table.column("id").to_pylist()]
        index += table.column("view").to_pylist()
        matrices.append(_matrix(table.column("embedding")))
    matrices = [m for m in matrices if m.size]
    points = np.concatenate(matrices) if matrices else np.zeros((0, corpus.pooled.shape[1]), np.float32)
    return np.asarray(owners, int), np.asarray(index, int), points
