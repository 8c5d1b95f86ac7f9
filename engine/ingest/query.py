"""Text queries over a run folder or a results file: panoramas (or views) ranked by CLIP similarity, exactly.

    from engine.ingest.query import query, write_results
    hits = query("runs/rome", "a baroque church", top=20)      # hits.positive, hits.negative: lists of dicts
    hits = query("results.parquet", "a baroque church")         # the file `mimetic embed` wrote: the same
    write_results(hits, "runs/rome/queries/a-baroque-church")   # .csv and .geojson

The text is embedded by the target's own model (its configuration is in the run's manifest, or in a
results file's schema metadata), and scored
against every stored embedding with one torch matrix product per part file, on the GPU when there
is one: an exact search, no index. Only committed shards are read. ``positive`` holds the ``top``
best matches, best first; ``negative`` the ``top`` worst, worst first, taken from the rest (no row
is both). The GeoJSON puts each at its lat/lon with ``polarity`` "positive" or "negative": the
circles of a "World Gist" map.

Ids and metadata come from whoever made the dump, so what is written treats them as data: the CSV
escapes every text cell a spreadsheet would run as a formula (``engine.results.write_csv``), and
``format_results`` escapes control characters, so that an id cannot break a line or steer the
terminal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import EngineConfig
from engine.ingest.inputs import InputError
from engine.ingest.run import RunFolder, committed_parts
from engine.results import KINDS, read_engine_config, write_csv

COLUMNS = {
    "panoramas": ["id", "lat", "lon", "heading", "captured_at", "source"],
    "views": ["id", "view", "yaw", "pitch", "bearing", "lat", "lon"],
}


@dataclasses.dataclass
class QueryResult:
    text: str
    table: str  # "panoramas" or "views"
    rows: int  # how many were scored
    positive: list[dict]
    negative: list[dict]


def run_engine(target: str | os.PathLike, device: str = "auto"):
    """An Engine with the target's model and weights (no vocabularies: only its text tower is needed).

    ``target`` is an ingest run folder or a results file of ``mimetic embed``."""
    if Path(target).is_file():
        try:
            stored = read_engine_config(target)
        except ValueError as exc:  # the command's one-line error, as for a folder that is not a run
            raise InputError(str(exc)) from None
    else:
        stored = RunFolder(target).load_manifest()["engine_config"]
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    stored = {k: v for k, v in stored.items() if k in fields}
    stored.update(vocabularies=(), device=device)
    from engine.pipeline import Engine

    return Engine(EngineConfig(**stored))  # --random-weights: config.seed gives the run's own model


def _parts(target: str | os.PathLike, table: str) -> list[tuple[Path, list | None]]:
    """(Parquet file, row filter) for each part holding ``table``'s rows: a run's committed parts, or
    a results file's rows of the matching kind."""
    if Path(target).is_file():
        return [(Path(target), [("kind", "=", KINDS[table])])]
    return [(part, None) for part in committed_parts(target, table)]


def _read(part: Path, row_filter, columns: list[str]) -> pa.Table:
    """The part's columns (a column the part does not have, e.g. lat in a results file, reads as nulls)."""
    present = set(pq.read_schema(part).names)
    table = pq.read_table(part, columns=[c for c in columns if c in present], filters=row_filter)
    for name in columns:
        if name not in present:
            table = table.append_column(name, pa.nulls(len(table)))
    return table.select(columns)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """list<float16> -> (N, D) float16, without a Python loop."""
    lists = column.combine_chunks()
    if len(lists) == 0:
        return np.zeros((0, 0), np.float16)
    values = lists.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(lists), -1)


def query(run: str | os.PathLike, text: str, *, top: int = 20, views: bool = False, engine=None, device: str = "auto") -> QueryResult:
    """Rank the run's panoramas (or views) by cosine similarity to ``text``; both ends of the ranking."""
    import torch

    if top <= 0:
        raise ValueError(f"top must be positive, got {top}")
    table = "views" if views else "panoramas"
    engine = engine or run_engine(run, device)
    query_vector = engine.embed_text([text])[0].to(engine.device, torch.float32)
    # The stored embeddings are fp16; scored in fp32 whatever the model runs in (a bf16 model's 8-bit mantissa
    # would tie and reorder close scores) and whatever the device: one matrix-vector product is cheap.
    dtype = torch.float32
    parts = _parts(run, table)
    scores = []
    for part, row_filter in parts:
        with warnings.catch_warnings():  # Arrow's buffer is read-only; the tensor is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            embeddings = torch.from_numpy(_matrix(_read(part, row_filter, ["embedding"]).column("embedding")))
        if len(embeddings):
            scores.append((embeddings.to(engine.device, dtype) @ query_vector.to(dtype)).float().cpu())
        else:
            scores.append(torch.zeros(0))
    sizes = [len(s) for s in scores]
    scores = torch.cat(scores) if scores else torch.zeros(0)
    count = len(scores)
    best = torch.topk(scores, min(top, count)).indices.tolist()
    rest = torch.ones(count, dtype=torch.bool)
    rest[best] = False
    remaining = rest.nonzero().flatten()
    worst = remaining[torch.topk(-scores[remaining], min(top, len(remaining))).indices].tolist()

    starts = np.cumsum([0, *sizes])
    wanted: dict[int, list[int]] = {}
    for row in best + worst:
        part = int(np.searchsorted(starts, row, side="right") - 1)
        wanted.setdefault(part, []).append(row)
    records = {}
    for part, rows in wanted.items():  # only the parts holding a hit are read again, for their columns
        data = _read(*parts[part], COLUMNS[table]).take([row - starts[part] for row in rows]).to_pylist()
        records.update(zip(rows, data, strict=True))

    def ranked(indices: list[int], polarity: str) -> list[dict]:
        return [{"polarity": polarity, "rank": rank, "score": float(scores[i]), **records[i]} for rank, i in enumerate(indices, 1)]

    return QueryResult(text, table, count, ranked(best, "positive"), ranked(worst, "negative"))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "query"


def write_results(result: QueryResult, prefix: str | os.PathLike) -> tuple[Path, Path]:
    """PREFIX.csv (positive then negative rows) and PREFIX.geojson (a Point per row with lat/lon)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rows = result.positive + result.negative
    columns = ["polarity", "rank", "score", *COLUMNS[result.table]]
    csv_path, geojson_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".geojson")
    write_csv(csv_path, rows, columns)  # spreadsheet-safe: "=HYPERLINK(...)" is text there, a score stays a number
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [row["lon"], row["lat"]]}
            if row.get("lat") is not None and row.get("lon") is not None else None,
            "properties": {k: v for k, v in row.items() if k not in ("lat", "lon")},
        }
        for row in rows
    ]
    document = {"type": "FeatureCollection", "query": result.text, "table": result.table, "scored": result.rows,
                "features": features}
    geojson_path.write_text(json.dumps(document, indent=1) + "\n")
    return csv_path, geojson_path


def printable(text: str) -> str:
    """``text`` safe to print: every character a terminal would act on (newline, CR, ESC, a bidi override,
    any other non-printable one) written as Python writes it in a string literal: ``\\n``, ``\\x1b``, ``\\u202e``."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return printable(str(value))


def format_results(result: QueryResult) -> str:
    """The ranking as a plain table, best first, then the worst; one line per row whatever its id holds."""
    extra = ["view", "bearing"] if result.table == "views" else []
    lines = [f"{result.text!r}: {result.rows} {result.table} scored"]
    for title, rows in (("top", result.positive), ("bottom", result.negative)):
        lines.append(f"{title}:")
        for row in rows:
            where = f"{row['lat']:.5f},{row['lon']:.5f}" if row.get("lat") is not None and row.get("lon") is not None else "-"
            more = "".join(f"  {key} {_shown(row.get(key))}" for key in extra)
            lines.append(f"  {row['rank']:>4}  {row['score']:+.4f}  {printable(row['id'])}  {where}{more}")
    return "\n".join(lines)
