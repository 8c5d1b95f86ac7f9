"""City dumps -> a run folder of sharded Parquet, exactly once, resumable after a crash anywhere.

    from engine.ingest.job import ingest
    summary = ingest("rome/", "runs/rome", config=EngineConfig(...), metadata=["rome.csv"], north_up=True)

Inputs (``list_inputs``): a folder of images (jpg, jpeg, png, webp; recursive; dot-files skipped),
WebDataset ``.tar`` shards (``key.jpg`` plus ``key.json``, in the folder or given directly), or a
listing file of paths (one a line, relative to the listing's folder). Metadata (``--metadata``) is
CSV, JSONL or GeoJSON, keyed by id, file name or stem; every column is kept (as the ``meta`` JSON),
and the ones real dumps use are also read into typed columns: lat/lon (also a GeoJSON point),
heading (heading, computed_compass_angle, compass_angle, Mapillary's ``ca``, bearing) and
captured_at (epoch seconds or milliseconds become ISO 8601 UTC).

The run folder:

    RUN/manifest.json              the configuration, its hash, the shard plan, and every committed shard
                                   (its part files, each with its byte size and sha256)
    RUN/listing.parquet            the inputs as planned (id, source, meta, shard, signature): to explain a changed dump
    RUN/panoramas/part-NNNNNN.parquet   id, source, lat, lon, heading, captured_at, meta, pooled embedding, labels
    RUN/views/part-NNNNNN.parquet       id, view, yaw, pitch, roll, fov, pano_yaw, bearing, lat, lon, embedding, labels
    RUN/quarantine/part-NNNNNN.parquet  id, source, reason, meta: the inputs that failed (only for shards with failures)
    RUN/summary.json               counts, panoramas/s, views/s, wall time

Exactly once. Shard k is the fixed slice ``[k * shard_size, (k + 1) * shard_size)`` of the inputs
sorted by id, so a resumed run re-derives the same shards (and refuses if the dump or the settings
changed, saying what differs). A shard is committed in three steps: (1) each part is written under a
dot-name (``.part-NNNNNN.parquet.<token>.tmp``, which Arrow readers skip) and fsynced; (2) each is
renamed to its final name; (3) the shard is added to the manifest, itself written to a temporary file,
fsynced and renamed over the old one. Step 3's rename is the commit. A kill before it leaves at worst
temporary files and final-named parts of a shard the manifest does not list; resuming deletes both
and redoes that shard. A kill after it leaves the shard done. So every input ends up exactly once
whatever moment the process dies. A shard has one file name per table, so the folders never hold
two copies of anything; while a run goes on (or after a crash, until it is resumed) they may hold a
shard not yet committed, which ``read_run`` and ``committed_parts`` leave out. A shard's parts are written the same way by one process or by many (Ray
actors, ``engine.ingest.ray``), since a retried shard renames identical content over the same names;
the manifest has a single writer, the driver, which holds ``RUN/.lock`` for the whole job.

Integrity. Each part's byte size and sha256 are recorded in its shard's manifest entry at commit.
Every run checks the committed parts' sizes (a stat each) and ``--verify`` their hashes too; a shard
whose parts differ is taken out of the manifest and redone, and the run says so. Every input is
signed by its size and modification time (by its content with ``--hash-inputs``), and the
signatures are part of the dump's digest: a file replaced under the same name is a changed dump.
A manifest is checked when it is read: its shape, and that it names only the run's own part files,
inside the run folder; anything else is refused before a file is touched. A run with no committed
shard protects nothing, so it starts again when its settings or inputs change.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import __version__
from engine.config import EngineConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_SHARD_SIZE = 1000
TABLES = ("panoramas", "views", "quarantine")
MANIFEST = "manifest.json"
LISTING = "listing.parquet"
SUMMARY = "summary.json"
FORMAT = 1
# How a run tells that its inputs are the ones it started with (Listing.sign): size and modification
# time by default, content with --hash-inputs; runs started before inputs were signed compare ids
# and metadata only.
COMPARISONS = ("size+mtime", "sha256")
LEGACY_COMPARISON = "ids+metadata"
HASH_THREADS = 8  # hashlib releases the GIL: --hash-inputs reads several files at once
MAX_METADATA_DEPTH = 64  # JSON metadata nested deeper is refused (a GeoJSON MultiPolygon needs 4)

# Metadata columns the real dumps use, most specific first (Mapillary's API v4, its sequence dumps'
# ``key, lon, lat, ca, captured_at, pano``, Street View metadata, plain CSVs).
ID_COLUMNS = ("id", "key", "image_id", "image_key", "pano_id", "panoid", "filename", "file_name", "file", "path", "image", "name")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")
HEADING_COLUMNS = ("heading", "computed_compass_angle", "compass_angle", "ca", "bearing", "compass", "direction")
TIME_COLUMNS = ("captured_at", "capture_time", "timestamp", "datetime", "date", "time")


class RunMismatchError(ValueError):
    """The run folder was started with other settings or other inputs; the message says what differs."""


class InputError(ValueError):
    """The dump, a listing or a metadata file cannot be read."""


class RunFolderError(InputError):
    """The run folder's manifest is damaged, of the wrong shape, or names a path that is not one of the
    run's own part files. Refused before anything is touched."""


class RunWriteError(OSError):
    """The run folder cannot be written (a full disk, a read-only folder). What was committed stays."""

    def __init__(self, path: Path, exc: OSError, doing: str = "cannot write"):
        reason = exc.strerror or str(exc)
        super().__init__(
            f"{path}: {doing} ({reason}). The shards committed so far are kept: free some space or make the "
            "folder writable, then run the same command again to resume."
        )
        self.errno = exc.errno


# -- inputs ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class InputItem:
    """One panorama to ingest: a file, or a member of a tar (``offset``/``size`` of its bytes in it)."""

    id: str
    source: str  # a file path, or "TAR#MEMBER"
    meta: dict = dataclasses.field(default_factory=dict)
    tar: str | None = None
    offset: int = -1
    size: int = -1
    keys: tuple[str, ...] = ()  # names metadata may use for it: file name, stem, tar key
    signature: str = ""  # what says the input is the same one: "SIZE:MTIME_NS" or "sha256:HEX" (Listing.sign)

    def read(self) -> bytes | str:
        """The file's path (the Engine reads it in its decode threads), or a tar member's bytes."""
        if self.tar is None:
            return self.source
        with open(self.tar, "rb") as stream:
            stream.seek(self.offset)
            return stream.read(self.size)


@dataclasses.dataclass
class Listing:
    """The inputs sorted by id (unique), and how the metadata matched them."""

    items: list[InputItem]
    metadata_rows: int = 0
    metadata_unmatched: int = 0  # metadata rows naming no input
    inputs_without_metadata: int = 0

    compared_by: str = LEGACY_COMPARISON

    def sign(self, compared_by: str) -> None:
        """Give every input its signature: its size and modification time ("size+mtime", a stat each), or
        the sha256 of its bytes ("sha256", ``--hash-inputs``: every input read once). A file replaced
        under the same name then changes the digest. A tar member is signed by its size and the tar's
        modification time, or by its own bytes."""
        if compared_by == "sha256":
            with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="mimetic-hash") as pool:
                signatures = list(pool.map(_content_signature, self.items))
        elif compared_by == "size+mtime":
            stats: dict[str, str] = {}
            signatures = [_stat_signature(item, stats) for item in self.items]
        elif compared_by == LEGACY_COMPARISON:  # a run started before inputs were signed: ids and metadata only
            signatures = [""] * len(self.items)
        else:
            raise ValueError(f"unknown input comparison {compared_by!r}")
        for item, signature in zip(self.items, signatures, strict=True):
            item.signature = signature
        self.compared_by = compared_by

    def digest(self) -> str:
        """sha256 over ids, metadata and signatures, in order: a dump that changed gives another digest."""
        h = hashlib.sha256()
        for item in self.items:
            line = f"{item.id}\t{json.dumps(item.meta, sort_keys=True, default=str)}"
            h.update((f"{line}\t{item.signature}\n" if item.signature else f"{line}\n").encode())
        return h.hexdigest()


def _stat_signature(item: InputItem, tars: dict[str, str]) -> str:
    if item.tar is not None:
        if item.tar not in tars:
            try:
                tars[item.tar] = str(os.stat(item.tar).st_mtime_ns)
            except OSError:
                tars[item.tar] = "missing"
        return f"{item.size}:{tars[item.tar]}"
    try:
        stat = os.stat(item.source)
    except OSError:
        return "missing"  # it goes to the quarantine, as "cannot read"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _content_signature(item: InputItem) -> str:
    try:
        if item.tar is not None:
            return "sha256:" + hashlib.sha256(item.read()).hexdigest()
        with open(item.source, "rb") as stream:
            return "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError:
        return "missing"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _posix_stem(path: str) -> str:
    """'a/b/c.jpg' -> 'a/b/c'."""
    head, _, tail = path.rpartition("/")
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}/{stem}" if head else stem


def _scan_folder(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(preferred id, fallback id, path) for every image under ``root``; tars are expanded."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            if _hidden(name):
                continue
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if _is_image(name):
                yield _posix_stem(rel), rel, path
            elif name.lower().endswith(".tar"):
                yield from _scan_tar(path, prefix=rel)


def _scan_tar(path: Path, prefix: str) -> Iterator[tuple[str, str, tuple]]:
    """WebDataset: a sample is every member sharing a key (the member name up to its basename's first dot)."""
    try:
        with tarfile.open(path, "r:") as tar:  # plain tar only: members are read back by offset
            members = [m for m in tar.getmembers() if m.isfile()]
            jsons = {}
            for member in members:
                if member.name.lower().endswith(".json"):
                    jsons[_webdataset_key(member.name)] = _parse_json(tar.extractfile(member).read(), f"{path}#{member.name}")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: cannot read the tar ({exc})") from exc
    for member in members:
        if _is_image(member.name):
            key = _webdataset_key(member.name)
            meta = jsons.get(key, {})
            yield key, f"{prefix}/{member.name}", (path, member, meta if isinstance(meta, dict) else {"json": meta})


def _webdataset_key(name: str) -> str:
    head, _, tail = name.rpartition("/")
    base = tail.split(".", 1)[0]
    return f"{head}/{base}" if head else base


def _scan_listing(listing: Path) -> Iterator[tuple[str, str, object]]:
    base = listing.parent
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{listing}: cannot read the listing ({exc})") from exc
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else base / entry
        if entry.lower().endswith(".tar"):
            yield from _scan_tar(path, prefix=entry)
        elif _is_image(entry):
            yield _posix_stem(entry.lstrip("/")), entry, path  # a missing file fails later, in the quarantine
        else:
            raise InputError(f"{listing}:{number}: {entry!r} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a .tar")


def list_inputs(dump: str | os.PathLike, metadata: Sequence[str | os.PathLike] = ()) -> Listing:
    """Every input of a dump folder, a WebDataset ``.tar`` or a listing file, with its metadata, sorted by id.

    Ids are paths relative to the dump without the extension (``seq1/abc``), or a tar sample's key;
    where two inputs would share one, both keep their extension or tar path instead.
    """
    dump = Path(dump).resolve()  # sources are absolute: Ray actors and later readers may run elsewhere
    if dump.is_dir():
        found = list(_scan_folder(dump))
    elif dump.is_file() and dump.name.lower().endswith(".tar"):
        found = list(_scan_tar(dump, prefix=dump.name))
    elif dump.is_file():
        found = list(_scan_listing(dump))
    else:
        raise InputError(f"{dump}: no such folder, .tar or listing file")
    if not found:
        raise InputError(f"{dump}: no images ({', '.join(IMAGE_EXTENSIONS)}) or WebDataset .tar shards found")

    counts: dict[str, int] = {}
    for preferred, _, _ in found:
        counts[preferred] = counts.get(preferred, 0) + 1
    items, seen = [], set()
    for preferred, fallback, where in found:
        item_id = preferred if counts[preferred] == 1 else fallback
        base, n = item_id, 1
        while item_id in seen:  # a tar may hold the same member name twice
            n += 1
            item_id = f"{base}~{n}"
        seen.add(item_id)
        name = fallback.rsplit("/", 1)[-1]
        keys = (item_id, fallback, name, name.rsplit(".", 1)[0])
        if isinstance(where, tuple):
            tar, member, meta = where
            items.append(
                InputItem(item_id, f"{tar}#{member.name}", dict(meta), os.fspath(tar), member.offset_data, member.size,
                          (*keys, preferred, preferred.rsplit("/", 1)[-1]))
            )
        else:
            items.append(InputItem(item_id, os.fspath(where), {}, keys=keys))
    items.sort(key=lambda item: item.id)

    listing = Listing(items)
    matched = set()
    for path in metadata:  # file after file: a later file adds columns, or replaces the same ones
        rows = read_metadata(path)
        index = _metadata_index(rows)
        used = set()
        for item in items:
            row = next((index[key] for key in item.keys if key in index), None)
            if row is not None:
                item.meta.update(row[1])
                used.add(row[0])
                matched.add(item.id)
        listing.metadata_rows += len(rows)
        listing.metadata_unmatched += len(rows) - len(used)
    listing.inputs_without_metadata = len(items) - len(matched)
    return listing


def _metadata_index(rows: list[dict]) -> dict[str, tuple[int, dict]]:
    index = {}
    for number, row in enumerate(rows):
        for column in ID_COLUMNS:
            value = row.get(column)
            if value not in (None, ""):
                key = str(value)
                index.setdefault(key, (number, row))  # the first row naming an input wins
                # A path or file name also matches by its stem: "abc.jpg" and "seq/abc.jpg" find abc.jpg.
                if column in ("filename", "file_name", "file", "path", "image"):
                    index.setdefault(key.rsplit("/", 1)[-1], (number, row))
                break
    return index


def _parse_json(text: str | bytes, where: str):
    """A JSON document, or an InputError naming ``where``: invalid, or nested deeper than MAX_METADATA_DEPTH
    (the decoder itself would hit Python's recursion limit, and so would every later json.dumps of it)."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply (more than {MAX_METADATA_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    if _depth(document) > MAX_METADATA_DEPTH:
        raise InputError(f"{where}: JSON nested too deeply (more than {MAX_METADATA_DEPTH} levels)")
    return document


def _depth(document) -> int:
    """How deeply lists and objects nest in ``document``, without recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            if depth <= MAX_METADATA_DEPTH:  # deeper is refused anyway: no need to walk it all
                stack.extend((child, depth + 1) for child in children)
    return deepest


def _read_csv(text: str, path: Path, dialect: str) -> list[dict]:
    """Rows of a CSV. A field may be as long as the file: csv's default limit (128 KiB) is arbitrary, and
    long fields are real (WKT geometries, descriptions); the text is already in memory."""
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)  # a quoted field keeps its line breaks
    try:
        return [dict(row) for row in reader]
    except csv.Error as exc:
        raise InputError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV/TSV, JSONL or GeoJSON (or JSON list) metadata file, every column kept as given.

    A GeoJSON feature's properties become the row, its id the ``id`` (unless a property says
    otherwise), and a point geometry the ``lon``/``lat``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the metadata ({exc})") from exc
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, path, "excel-tab" if suffix == ".tsv" else "excel")
    if suffix in (".jsonl", ".ndjson"):
        rows = [_parse_json(line, f"{path}:{number}") for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif suffix in (".json", ".geojson"):
        document = _parse_json(text, str(path))
        if isinstance(document, dict) and document.get("type") == "FeatureCollection":
            features = document.get("features", [])
            if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
                raise InputError(f"{path}: a FeatureCollection's features must be a list of objects")
            rows = [_feature_row(feature) for feature in features]
        elif isinstance(document, list):
            rows = document
        else:
            raise InputError(f"{path}: expected a GeoJSON FeatureCollection or a JSON list of objects")
    else:
        raise InputError(f"{path}: metadata must be .csv, .tsv, .jsonl, .ndjson, .json or .geojson")
    bad = [k for k, row in enumerate(rows) if not isinstance(row, dict)]
    if bad:
        raise InputError(f"{path}: row {bad[0] + 1} is not an object")
    return rows


def _feature_row(feature: dict) -> dict:
    properties = feature.get("properties") or {}
    row = dict(properties) if isinstance(properties, dict) else {"properties": properties}
    if feature.get("id") is not None:
        row.setdefault("id", feature["id"])
    geometry = feature.get("geometry")
    if isinstance(geometry, dict) and geometry.get("type") == "Point":
        coordinates = geometry.get("coordinates")
        if isinstance(coordinates, list) and len(coordinates) >= 2:
            row.setdefault("lon", coordinates[0])
            row.setdefault("lat", coordinates[1])
    return row


def _number(value) -> float | None:
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _first(meta: dict, columns: Sequence[str]):
    for column in columns:
        if meta.get(column) not in (None, ""):
            return meta[column]
    return None


def canonical_fields(meta: dict) -> dict:
    """lat, lon (degrees), heading (degrees clockwise from north, in [0, 360)) and captured_at (text)."""
    lat, lon = _number(_first(meta, LAT_COLUMNS)), _number(_first(meta, LON_COLUMNS))
    geometry = meta.get("geometry") or meta.get("computed_geometry")
    coordinates = geometry.get("coordinates") if isinstance(geometry, dict) and geometry.get("type") == "Point" else None
    if (lat is None or lon is None) and isinstance(coordinates, list) and len(coordinates) >= 2:
        lon, lat = _number(coordinates[0]), _number(coordinates[1])
    if lat is not None and not -90 <= lat <= 90:
        lat = None
    if lon is not None and not -180 <= lon <= 180:
        lon = None
    heading = _number(_first(meta, HEADING_COLUMNS))
    return {
        "lat": lat,
        "lon": lon,
        "heading": heading % 360.0 if heading is not None else None,
        "captured_at": _timestamp(_first(meta, TIME_COLUMNS)),
    }


def _timestamp(value) -> str | None:
    """Epoch seconds or milliseconds (Mapillary's captured_at) -> ISO 8601 UTC; text stays as it is."""
    if value is None:
        return None
    number = _number(value)
    if number is None or (isinstance(value, str) and not value.strip().lstrip("-").replace(".", "", 1).isdigit()):
        return str(value)
    seconds = number / 1000.0 if abs(number) >= 1e11 else number
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(value)


# -- tables ---------------------------------------------------------------------------------------

LABEL = pa.struct([("vocabulary", pa.string()), ("label", pa.string()), ("probability", pa.float32())])
EMBEDDING = pa.list_(pa.float16())

PANORAMAS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("shard", pa.int32()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("heading", pa.float64()),  # compass bearing of the panorama's centre column (yaw 0), from the metadata
        ("captured_at", pa.string()),
        ("meta", pa.string()),  # JSON: every metadata column, as given
        ("yaw_offset", pa.float64()),  # added to every view's yaw when cutting (-heading with --north-up)
        ("embedding", EMBEDDING),  # pooled: the L2-normalised mean of the view embeddings, fp16
        ("labels", pa.list_(LABEL)),  # top-k per vocabulary, pooled
    ]
)
VIEWS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the panorama's id
        ("view", pa.int32()),  # index in the view set
        ("yaw", pa.float32()),  # the view set's yaw: a compass bearing with --north-up
        ("pitch", pa.float32()),
        ("roll", pa.float32()),
        ("fov", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pano_yaw", pa.float32()),  # where the view was cut, in the panorama's own frame (0 = centre column)
        ("bearing", pa.float32()),  # absolute compass bearing (0 = north, 90 = east); null without a heading
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("embedding", EMBEDDING),  # L2-normalised, fp16
        ("labels", pa.list_(LABEL)),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("shard", pa.int32()), ("reason", pa.string()), ("meta", pa.string())]
)
SCHEMAS = {"panoramas": PANORAMAS_SCHEMA, "views": VIEWS_SCHEMA, "quarantine": QUARANTINE_SCHEMA}
DESCRIPTIONS = {
    "panoramas": "one row per panorama embedded: metadata, pooled CLIP embedding, top labels per vocabulary",
    "views": "one row per perspective view: panorama id, view spec, absolute bearing when the heading is known, embedding, top labels",
    "quarantine": "one row per input that failed, with the reason",
}


def _label_lists(rows: list[dict]) -> pa.Array:
    """[{vocabulary: [(label, p), ...]}] -> list<struct<vocabulary, label, probability>>."""
    offsets, vocabularies, labels, probabilities = [0], [], [], []
    for row in rows:
        for name, pairs in row.items():
            for label, p in pairs:
                vocabularies.append(name)
                labels.append(label)
                probabilities.append(p)
        offsets.append(len(labels))
    values = pa.StructArray.from_arrays(
        [pa.array(vocabularies, pa.string()), pa.array(labels, pa.string()), pa.array(probabilities, pa.float32())],
        fields=list(LABEL),
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _embedding_lists(matrix: np.ndarray) -> pa.Array:
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * dim)  # dim is 0 for a shard where every input failed
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.astype(np.float16).reshape(-1), pa.float16()))


def _table(name: str, columns: dict, context: dict) -> pa.Table:
    schema = SCHEMAS[name].with_metadata(
        {"mimetic": json.dumps({"table": name, "description": DESCRIPTIONS[name], **context})}
    )
    arrays = [c if isinstance(c, pa.Array) else pa.array(c, f.type) for f, c in ((f, columns[f.name]) for f in schema)]
    return pa.Table.from_arrays(arrays, schema=schema)


def yaw_offset(item: InputItem, north_up: bool) -> float:
    """-heading with --north-up: view yaw v is then cut at v - heading in the panorama, i.e. bearing v."""
    heading = canonical_fields(item.meta)["heading"]
    return -heading if north_up and heading is not None else 0.0


def shard_tables(shard: int, outcomes: Sequence[tuple[InputItem, object]], north_up: bool, context: dict) -> dict[str, pa.Table]:
    """One shard's (item, EmbedResult) pairs -> its panoramas, views and quarantine tables.

    The views table is built column by column with numpy (every panorama has the same view set), so
    writing a shard costs little next to embedding it, even at GPU rates.
    """
    failed = [(item, r) for item, r in outcomes if r.error is not None]
    done = [(item, r) for item, r in outcomes if r.error is None]
    quarantine = {"id": [i.id for i, _ in failed], "source": [i.source for i, _ in failed], "shard": [shard] * len(failed),
                  "reason": [r.error for _, r in failed], "meta": [json.dumps(i.meta, default=str, sort_keys=True) for i, _ in failed]}
    fields = [canonical_fields(item.meta) for item, _ in done]
    offsets = np.asarray([yaw_offset(item, north_up) for item, _ in done], np.float64)
    column = lambda key: [f[key] for f in fields]  # noqa: E731
    dim = done[0][1].embeddings.shape[-1] if done else 0
    pano = {
        "id": [item.id for item, _ in done], "source": [item.source for item, _ in done], "shard": [shard] * len(done),
        "lat": column("lat"), "lon": column("lon"), "heading": column("heading"), "captured_at": column("captured_at"),
        "meta": [json.dumps(item.meta, default=str, sort_keys=True) for item, _ in done], "yaw_offset": offsets,
        "embedding": _embedding_lists(np.stack([r.pooled.float().numpy() for _, r in done]) if done else np.zeros((0, dim))),
        "labels": _label_lists([{name: reading["pooled"] for name, reading in r.readings.items()} for _, r in done]),
    }

    specs = done[0][1].views if done else []
    count = len(specs)
    spec = {key: np.asarray([getattr(v, key) for v in specs], np.float64) for key in ("yaw", "pitch", "roll", "fov", "width", "height")}
    cut_at = (spec["yaw"][None, :] + offsets[:, None]) % 360.0  # (M, N): where each view was cut in its panorama
    heading = np.asarray([np.nan if h is None else h for h in column("heading")], np.float64)[:, None]
    # With --north-up the view's own yaw is its bearing; taken directly, it stays exact.
    bearing = np.where(np.isnan(heading), np.nan, spec["yaw"][None, :] % 360.0 if north_up else (cut_at + heading) % 360.0)
    views = {
        "id": np.repeat(np.asarray(pano["id"], dtype=object), count), "view": np.tile(np.arange(count), len(done)),
        **{key: np.tile(values, len(done)) for key, values in spec.items()},
        "pano_yaw": cut_at.reshape(-1), "bearing": pa.array(bearing.reshape(-1), pa.float32(), from_pandas=True),
        "lat": np.repeat(np.asarray(pano["lat"], dtype=object), count), "lon": np.repeat(np.asarray(pano["lon"], dtype=object), count),
        "embedding": _embedding_lists(np.concatenate([r.embeddings.float().numpy() for _, r in done]) if done else np.zeros((0, dim))),
        "labels": _label_lists([{name: reading["views"][k] for name, reading in r.readings.items()}
                                for _, r in done for k in range(count)]),
    }
    context = {**context, "embedding_dim": dim}
    return {"panoramas": _table("panoramas", pano, context), "views": _table("views", views, context),
            "quarantine": _table("quarantine", quarantine, context)}


# -- the run folder -------------------------------------------------------------------------------


PART = re.compile(r"part-(\d+)\.parquet")


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename over ``path``: readers see the old file or the new one, whole.

    A failed write (a full disk, a read-only folder) leaves the old file as it was, removes its own
    temporary file, and raises RunWriteError naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _discard(tmp)
        raise RunWriteError(path, exc) from exc


def _discard(path: Path) -> None:
    """Remove a temporary file of a failed write, if it is there and can be removed (on a full disk it is
    what frees the space); a resume removes whatever is left."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise RunWriteError(path, exc, "cannot delete") from exc


def _sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    for kind, name in ((dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null"


def write_json_atomic(path: Path, document: dict, *, indent: int | None = 1) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(document, indent=indent, default=str) + "\n"))


def config_fingerprint(config: EngineConfig, *, north_up: bool, shard_size: int) -> dict:
    """Everything that changes what a shard holds: model and weights, views, vocabularies, code version.

    Batch size, device, decode workers, the decoded-bytes budget (``max_decode_mib``) and the engine
    (local or Ray) change how fast, not what, so they may differ between a run and its resumption.
    """
    from engine.views import view_set
    from engine.vocab import load_vocabulary

    views = [{k: getattr(v, k) for k in ("yaw", "pitch", "roll", "fov")} for v in view_set(config.views)]
    vocabularies = {}
    for name in config.vocabularies:
        vocabulary = load_vocabulary(name)
        vocabularies[vocabulary.name] = hashlib.sha256(f"{vocabulary.template}\n{vocabulary.labels_hash}".encode()).hexdigest()[:16]
    return {
        "clip_model": config.clip_model,
        "clip_weights": config.clip_weights,
        "weights_bytes": _weights_bytes(config),
        "random_weights": config.random_weights,
        "seed": config.seed if config.random_weights else None,  # it draws the untrained weights; unused otherwise
        "views": views,
        "vocabularies": vocabularies,
        "top_k": config.top_k,
        "antialias": config.antialias,
        "max_pixels": config.max_pixels,
        "north_up": north_up,
        "shard_size": shard_size,
        "mimetic_version": __version__,
        "code_version": _code_version(),
    }


def _weights_bytes(config: EngineConfig) -> int | None:
    """Size of the checkpoint file (or the local-dir folder's files): a replaced checkpoint shows."""
    path = Path(config.clip_model.removeprefix("local-dir:")) if config.clip_model.startswith("local-dir:") else None
    if config.clip_weights and Path(config.clip_weights).expanduser().is_file():
        path = Path(config.clip_weights).expanduser()
    if path is None or not path.exists():
        return None
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _code_version() -> str | None:
    """The git commit of the source tree, when it is a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def config_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def _differences(then: dict, now: dict) -> list[str]:
    def show(value) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 160 else text[:157] + "..."

    return [f"{key}: {show(then.get(key))} in the run, {show(now.get(key))} now"
            for key in sorted(set(then) | set(now)) if then.get(key) != now.get(key)]


DAMAGED = "Its parts are left as they are: restore the manifest from a backup, or ingest into a new --out folder."
ENTRY_COUNTS = ("shard", "inputs", "panoramas", "views", "quarantined")


class RunFolder:
    """The files of one run. ``open`` (driver only) creates or checks it; ``write_parts`` (any process)
    writes a shard's parts; ``commit`` (driver only) records the shard in the manifest.

    Every path the manifest names is checked when it is loaded: a shard may list only its own part
    files (``TABLE/part-NNNNNN.parquet``), resolving inside the run folder. A manifest naming anything
    else (``../x``, an absolute path, a symbolic link out, ``manifest.json``) is refused whole, before
    anything is read or deleted: run folders live on shared storage, and ``clean`` deletes files.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).resolve()
        self.manifest: dict = {}

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    def load_manifest(self) -> dict:
        """The manifest, checked: its shape, and that every path it names is one of the run's own parts."""
        path = self.manifest_path
        if not path.exists():
            raise InputError(f"{self.out}: not a mimetic run folder (no {MANIFEST})")
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise RunFolderError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
        if not text.strip():
            raise RunFolderError(f"{path}: the manifest is empty. {DAMAGED}")
        try:
            document = json.loads(text)
        except RecursionError:
            raise RunFolderError(f"{path}: the manifest is not valid JSON (nested too deeply). {DAMAGED}") from None
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise RunFolderError(f"{path}: the manifest is not valid JSON ({exc}). {DAMAGED}") from None
        self._check_manifest(document)
        self.manifest = document
        return document

    def _check_manifest(self, document) -> None:
        def refuse(problem: str, advice: str = DAMAGED):
            raise RunFolderError(f"{self.manifest_path}: {problem}. {advice}")

        def need(value, kind, what: str):
            if not isinstance(value, kind) or isinstance(value, bool):
                refuse(f"{what} must be {_json_type(kind())}, got {_json_type(value)}")

        need(document, dict, "the manifest")
        for key, kind in (("format", int), ("config", dict), ("config_hash", str), ("engine_config", dict),
                          ("inputs", dict), ("shards", dict)):
            need(document.get(key), kind, repr(key))
        if document["format"] > FORMAT:
            refuse(f"format {document['format']} was written by a newer mimetic (this one reads {FORMAT})",
                   "Upgrade mimetic to resume it.")
        for key, kind in (("count", int), ("digest", str), ("shards", int)):
            need(document["inputs"].get(key), kind, f"inputs.{key}")
        if document["inputs"].get("compared_by", LEGACY_COMPARISON) not in (*COMPARISONS, LEGACY_COMPARISON):
            refuse(f"inputs.compared_by must be one of {', '.join(COMPARISONS)}, got {document['inputs']['compared_by']!r}")
        need(document["config"].get("shard_size"), int, "config.shard_size")
        for key, entry in document["shards"].items():
            if not (key.isascii() and key.isdigit()):
                refuse(f"shards has an entry {key!r}, which is not a shard number")
            need(entry, dict, f"shard {key}")
            for field in ENTRY_COUNTS:
                need(entry.get(field), int, f"shard {key}: {field!r}")
            if entry["shard"] != int(key):
                refuse(f"shard {key}'s entry says it is shard {entry['shard']}")
            need(entry.get("files"), list, f"shard {key}: 'files'")
            own = {f"{table}/{part_name(int(key))}" for table in TABLES}
            for name in entry["files"]:
                if not isinstance(name, str) or name not in own:
                    refuse(f"shard {key} lists {name!r}, which is not one of its own part files "
                           f"({', '.join(sorted(own))}): refusing to touch it")
                target = (self.out / name).resolve()  # follows symbolic links, of the part or its folder
                if not target.is_relative_to(self.out):
                    refuse(f"shard {key} lists {name}, a symbolic link out of the run folder (to {target}): "
                           "refusing to touch it")
            parts = entry.get("parts", {})  # sizes and hashes; absent in manifests written before they were recorded
            need(parts, dict, f"shard {key}: 'parts'")
            for name, record in parts.items():
                if name not in entry["files"] or not isinstance(record, dict):
                    refuse(f"shard {key}: 'parts' describes {name!r}, which the shard does not list")
                need(record.get("bytes"), int, f"shard {key}: {name}: 'bytes'")
                need(record.get("sha256"), str, f"shard {key}: {name}: 'sha256'")

    @contextlib.contextmanager
    def lock(self):
        """One writer per run folder: a second ``mimetic ingest`` on it stops with a clear error. A folder
        that cannot be written is refused here, before any work."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            stream = open(self.out / ".lock", "a+")
        except OSError as exc:
            raise RunWriteError(self.out, exc, "cannot create the run folder") from exc
        with stream:
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunMismatchError(f"{self.out}: another mimetic ingest is writing this run folder") from None
            try:
                _probe(self.out)
                yield self
            finally:
                fcntl.flock(stream.fileno(), fcntl.LOCK_UN)

    def open(self, listing: Listing, fingerprint: dict, *, dump: str, engine_config: EngineConfig,
             hash_inputs: bool = False, verify: bool = False) -> dict:
        """Start the run, or check that resuming it is safe and clear what a crash left behind.

        A run folder with no committed shard holds nothing to protect: if its settings or inputs
        differ, it starts again with the new ones (and says so), so that a run that failed before any
        work (a wrong flag, a missing model) does not lock its folder.
        """
        wanted = "sha256" if hash_inputs else "size+mtime"
        if not self.manifest_path.exists():
            stray = [p for table in TABLES for p in (self.out / table).glob("part-*.parquet")]
            if stray:
                raise RunMismatchError(
                    f"{self.out} holds part files ({stray[0].relative_to(self.out)}, ...) but no {MANIFEST}: "
                    "it is not a run this command can resume; use a new --out folder"
                )
            return self._start(listing, fingerprint, dump, engine_config, wanted, verify)
        manifest = self.load_manifest()
        compared_by = manifest["inputs"].get("compared_by", LEGACY_COMPARISON)
        listing.sign(compared_by)  # the run's own way, so that its digest can be compared
        differences = _differences(manifest["config"], fingerprint)
        same_inputs = manifest["inputs"]["digest"] == listing.digest()
        if not manifest["shards"] and (differences or not same_inputs or compared_by != wanted):
            changed = differences or ([] if same_inputs else [self._explain_inputs(listing)])
            if compared_by != wanted:
                changed.append(f"inputs compared by {wanted}, {compared_by} before")
            print(f"mimetic ingest: {self.out} has no committed shard yet: starting it again with the new settings "
                  f"({'; '.join(changed)})", file=sys.stderr)
            listing.sign(wanted)
            return self._start(listing, fingerprint, dump, engine_config, wanted, verify, previous=manifest)
        if differences:
            raise RunMismatchError(
                f"refusing to resume {self.out}: it was started with another configuration; "
                + "; ".join(differences) + ". Use the run's settings, or a new --out folder."
            )
        if not same_inputs:
            advice = "Resume with the same dump and metadata, or use a new --out folder."
            if compared_by == "size+mtime":
                advice += (" (Inputs are compared by size and modification time: a dump copied without its times "
                           "looks replaced. A run started with --hash-inputs compares their contents instead.)")
            raise RunMismatchError(f"refusing to resume {self.out}: " + self._explain_inputs(listing) + ". " + advice)
        if compared_by != wanted and compared_by != LEGACY_COMPARISON:
            print(f"mimetic ingest: {self.out} compares its inputs by {compared_by}, as when it was started",
                  file=sys.stderr)
        self.manifest = manifest
        self.clean(verify=verify)
        return self.manifest

    def _start(self, listing: Listing, fingerprint: dict, dump: str, engine_config: EngineConfig, compared_by: str,
               verify: bool, previous: dict | None = None) -> dict:
        """A new manifest and listing (after clearing what an attempt that committed nothing left)."""
        if previous is not None:
            self.manifest = previous
            self.clean()
        if listing.compared_by != compared_by:
            listing.sign(compared_by)
        shard_size = fingerprint["shard_size"]
        inputs = {"count": len(listing.items), "digest": listing.digest(), "compared_by": compared_by,
                  "shards": math.ceil(len(listing.items) / shard_size)}
        self._write_listing(listing, shard_size)
        manifest = {
            "format": FORMAT, "created_at": _now(), "dump": dump, "config": fingerprint,
            "config_hash": config_hash(fingerprint), "engine_config": dataclasses.asdict(engine_config),
            "inputs": inputs, "shards": {},
        }
        write_json_atomic(self.manifest_path, manifest, indent=None)
        self.manifest = manifest
        self.clean(verify=verify)
        return manifest

    def _write_listing(self, listing: Listing, shard_size: int) -> None:
        items = listing.items
        table = pa.table({
            "id": [i.id for i in items], "source": [i.source for i in items],
            "shard": pa.array([k // shard_size for k in range(len(items))], pa.int32()),
            "meta": [json.dumps(i.meta, sort_keys=True, default=str) for i in items],
            "signature": [i.signature for i in items],
        })
        _write_atomic(self.out / LISTING, lambda tmp: pq.write_table(table, tmp))

    def _explain_inputs(self, listing: Listing) -> str:
        then_count = self.manifest["inputs"]["count"] if self.manifest else None
        text = f"its inputs changed ({then_count} then, {len(listing.items)} now"
        try:
            then = pq.read_table(self.out / LISTING).to_pydict()
        except (OSError, pa.ArrowException):
            return text + ")"
        text = f"its inputs changed ({len(then['id'])} then, {len(listing.items)} now"
        old = dict(zip(then["id"], then["meta"], strict=True))
        old_signature = dict(zip(then["id"], then.get("signature", [""] * len(then["id"])), strict=True))
        new = {i.id: json.dumps(i.meta, sort_keys=True, default=str) for i in listing.items}
        new_signature = {i.id: i.signature for i in listing.items}
        kept = set(old) & set(new)
        parts = []
        for label, ids in (("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
                           ("with other metadata", sorted(k for k in kept if old[k] != new[k])),
                           (f"replaced (another {'content' if listing.compared_by == 'sha256' else 'size or modification time'})",
                            sorted(k for k in kept if old_signature[k] and old_signature[k] != new_signature[k]))):
            if ids:
                parts.append(f"{len(ids)} {label}: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}")
        return text + ("; " + "; ".join(parts) if parts else "") + ")"

    def _table_folder(self, table: str) -> Path:
        """RUN/TABLE, created if missing; a symbolic link there is refused, since clean() deletes in it."""
        folder = self.out / table
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise RunFolderError(f"{folder}: not a folder of the run but a link or a file: refusing to touch it. "
                                 "A run folder's tables must be plain folders; use a new --out folder.")
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise RunWriteError(folder, exc, "cannot create") from exc
        return folder

    def check_parts(self, entry: dict, *, verify: bool = False) -> str | None:
        """Why a committed shard's parts are not the ones committed (missing, another size; with ``verify``
        another sha256), or None. Shards committed before sizes were recorded are checked for presence."""
        parts = entry.get("parts", {})
        for name in entry["files"]:
            path = self.out / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return f"{name} is missing"
            recorded = parts.get(name)
            if recorded is None:
                continue
            if size != recorded["bytes"]:
                return f"{name} is {size} bytes, {recorded['bytes']} when committed"
            if verify and _sha256(path) != recorded["sha256"]:
                return f"{name} does not match the sha256 recorded when it was committed"
        return None

    def clean(self, *, verify: bool = False) -> None:
        """Delete what an interrupted run left: temporary files, and parts of shards the manifest lacks.

        A committed shard whose parts are missing or differ from what was recorded at commit (their
        size; with ``verify`` also their sha256) leaves the manifest and is redone, and this says so.
        """
        committed = self.manifest["shards"]
        for table in TABLES:
            for path in self._table_folder(table).iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    _unlink(path)
                elif (match := PART.fullmatch(path.name)) is not None:
                    shard = str(int(match[1]))
                    if shard not in committed or f"{table}/{path.name}" not in committed[shard]["files"]:
                        _unlink(path)
        for path in self.out.glob(".*.tmp"):
            _unlink(path)
        damaged = {k: problem for k, entry in committed.items() if (problem := self.check_parts(entry, verify=verify))}
        if verify:
            print(f"mimetic ingest: verified {len(committed)} committed shards against their sha256: "
                  f"{len(damaged) or 'none'} damaged", file=sys.stderr)
        if damaged:
            for k, problem in damaged.items():
                print(f"mimetic ingest: shard {k}: {problem}; it will be redone", file=sys.stderr)
            # Out of the manifest first, then off the disk: a crash in between leaves parts no shard lists.
            self._write_manifest({**self.manifest, "shards": {k: e for k, e in committed.items() if k not in damaged}})
            for k in damaged:
                for name in committed[k]["files"]:
                    _unlink(self.out / name)

    def write_parts(self, shard: int, tables: dict[str, pa.Table]) -> dict[str, dict]:
        """Steps 1 and 2 of a commit: every part written under a temporary name, then all renamed.

        Returns ``{file: {"bytes", "sha256"}}`` for the manifest entry, read back from each part while
        it is fsynced (it is in the page cache). The quarantine part is written only when the shard has
        failures. Safe to run again for the same shard (a retry): identical content replaces identical
        content. A failed write removes its temporary files and raises RunWriteError.
        """
        token = uuid.uuid4().hex[:12]  # two attempts at one shard never share a temporary file
        staged, parts = [], {}
        final = self.out
        try:
            for table, rows in tables.items():
                if table == "quarantine" and rows.num_rows == 0:
                    continue
                final = self.out / table / part_name(shard)
                tmp = final.with_name(f".{final.name}.{token}.tmp")
                staged.append((tmp, final))
                pq.write_table(rows, tmp, compression="zstd")
                with open(tmp, "rb+") as stream:
                    digest = hashlib.file_digest(stream, "sha256").hexdigest()
                    os.fsync(stream.fileno())
                    parts[f"{table}/{final.name}"] = {"bytes": os.fstat(stream.fileno()).st_size, "sha256": digest}
            for tmp, final in staged:
                os.replace(tmp, final)
            for folder in {final.parent for _, final in staged}:
                _fsync_dir(folder)
        except OSError as exc:
            for tmp, _ in staged:
                _discard(tmp)
            raise RunWriteError(final, exc) from exc
        return parts

    def commit(self, entry: dict) -> None:
        """Step 3: the shard joins the manifest, rewritten atomically. After this the shard is done."""
        self._write_manifest({**self.manifest, "shards": {**self.manifest["shards"], str(entry["shard"]): entry}})

    def _write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest, indent=None)  # one line: rewritten at every commit
        self.manifest = manifest  # only once it is on disk: a failed write leaves both as they were

    def table_context(self) -> dict:
        """What every part file's schema metadata says about the run, besides its own table."""
        return {"config_hash": self.manifest["config_hash"], "mimetic_version": self.manifest["config"]["mimetic_version"]}

    def shards(self) -> int:
        return self.manifest["inputs"]["shards"]

    def pending(self) -> list[int]:
        return [k for k in range(self.shards()) if str(k) not in self.manifest["shards"]]


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: a read-only run folder is refused before the model loads."""
    probe = folder / f".probe.{uuid.uuid4().hex[:12]}.tmp"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        _discard(probe)
        raise RunWriteError(folder, exc, "cannot write the run folder") from exc


def committed_parts(run: str | os.PathLike, table: str) -> list[Path]:
    """The part files of ``table`` that the manifest lists: the run's rows, each exactly once. A part that
    is missing or not the size it was committed at is refused (``mimetic ingest`` redoes its shard)."""
    folder = RunFolder(run)
    manifest = folder.load_manifest()
    parts = []
    for k in sorted(manifest["shards"], key=int):
        entry = manifest["shards"][k]
        problem = folder.check_parts(entry)
        if problem:
            raise RunFolderError(f"{folder.out}: shard {k}: {problem}. Run the same mimetic ingest again: it redoes the shard.")
        parts += [folder.out / f for f in entry["files"] if f.startswith(f"{table}/")]
    return parts


def read_run(run: str | os.PathLike, table: str = "panoramas", columns: list[str] | None = None) -> pa.Table:
    """All committed rows of ``table`` ("panoramas", "views" or "quarantine") as one Arrow table."""
    parts = committed_parts(run, table)
    if not parts:
        return SCHEMAS[table].empty_table() if columns is None else SCHEMAS[table].empty_table().select(columns)
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts], promote_options="default")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- one shard, shared by the local job and the Ray actors ------------------------------------------


def _prepare(item: InputItem, north_up: bool):
    """The Engine's input for an item, or the reason it cannot be one."""
    from engine.pipeline import Panorama

    if north_up and canonical_fields(item.meta)["heading"] is None:
        return None, f"{item.id}: no heading in the metadata (needed by --north-up; columns read: {', '.join(HEADING_COLUMNS)})"
    try:
        data = item.read()
    except OSError as exc:
        return None, f"{item.id}: cannot read {item.source} ({exc.strerror or exc})"
    return Panorama(id=item.id, data=data, yaw_offset=yaw_offset(item, north_up)), None


def embed_in_order(engine, items: Iterable[InputItem], north_up: bool) -> Iterator[tuple[InputItem, object]]:
    """(item, EmbedResult) for every item, in order, through one continuous ``Engine.embed_iter``.

    Items that fail before the Engine (no heading with --north-up, unreadable tar) get an error result
    in place. The Engine runs ahead of this generator, so an item's early failure may be recorded only
    while the next result is fetched; results are matched to items by their (unique) id.
    """
    from engine.pipeline import EmbedResult

    items = list(items)
    early: dict[int, str] = {}

    def feed():
        for index, item in enumerate(items):
            panorama, error = _prepare(item, north_up)
            if error is None:
                yield panorama
            else:
                early[index] = error

    results = engine.embed_iter(feed())
    try:
        waiting = None
        for index, item in enumerate(items):
            if index not in early and waiting is None:
                # None once the Engine is done: then feed() has run to its end, and every item left
                # (all of them, when none had a heading under --north-up) failed early.
                waiting = next(results, None)
            if index in early:
                yield item, EmbedResult(id=item.id, views=engine.views, meta=item.meta, error=early.pop(index))
                continue
            if waiting is None or waiting.id != item.id:
                got = "no result" if waiting is None else f"the result for {waiting.id}"
                raise RuntimeError(f"internal: {got} arrived in the place of {item.id}")
            yield item, waiting
            waiting = None
    finally:
        # Stop the Engine's decode threads here and now. Left to the garbage collector (an exception's
        # traceback keeps the generator in a cycle), the pool's shutdown can run inside another thread's
        # start-up, under a lock of the threading module it then needs itself: a deadlock.
        results.close()


def build_shard(run: RunFolder, shard: int, outcomes: list, *, north_up: bool, context: dict, seconds: float) -> dict:
    """Write shard ``shard``'s parts (steps 1 and 2) and return its manifest entry (for step 3)."""
    tables = shard_tables(shard, outcomes, north_up, context)
    parts = run.write_parts(shard, tables)
    items = [item for item, _ in outcomes]
    return {
        "shard": shard, "first": items[0].id, "last": items[-1].id, "inputs": len(items),
        "panoramas": tables["panoramas"].num_rows, "views": tables["views"].num_rows,
        "quarantined": tables["quarantine"].num_rows, "files": list(parts), "parts": parts,
        "seconds": round(seconds, 3), "committed_at": _now(),
    }


def make_engine(config: EngineConfig):
    """The Engine for ``config``. With --random-weights it draws its untrained weights from ``config.seed``
    (which the fingerprint records), so every process (resume, Ray actors, query) builds the same model."""
    from engine.pipeline import Engine

    return Engine(config)


# -- progress ---------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar (panoramas/s, views/s, ETA, errors), or with ``quiet`` one plain log line per shard."""

    def __init__(self, total: int, shards: int, done_shards: int, *, quiet: bool, label: str = "ingest"):
        self.total, self.shards, self.done_shards, self.quiet, self.label = total, shards, done_shards, quiet, label
        self.panoramas = self.views = self.errors = 0
        self.started = time.perf_counter()  # made once the model is loaded: its rates are the embedding's
        self.finished: float | None = None
        self._shown = 0.0
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="pano", desc=label, dynamic_ncols=True, file=sys.stderr)

    def advance(self, panoramas: int, views: int, errors: int) -> None:
        self.panoramas += panoramas
        self.views += views
        self.errors += errors
        if self.bar is not None:
            self.bar.update(panoramas + errors)
            now = time.perf_counter()
            if now - self._shown > 0.5 or self.panoramas + self.errors == self.total:
                self._shown = now
                self.bar.set_postfix_str(f"{self.views / max(now - self.started, 1e-9):.1f} views/s, {self.errors} errors")

    def shard_done(self, entry: dict) -> None:
        self.done_shards += 1
        if self.quiet:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            done = self.panoramas + self.errors
            eta = (self.total - done) * elapsed / done if done else float("nan")
            print(
                f"[{self.label}] shard {entry['shard']} committed ({self.done_shards}/{self.shards}): "
                f"{entry['panoramas']} panoramas, {entry['views']} views, {entry['quarantined']} quarantined | "
                f"{self.panoramas / elapsed:.2f} panoramas/s, {self.views / elapsed:.1f} views/s, "
                f"{self.errors} errors, ETA {_duration(eta)}",
                file=sys.stderr, flush=True,
            )

    def close(self) -> None:
        self.finished = time.perf_counter()
        if self.bar is not None:
            self.bar.close()

    def seconds(self) -> float:
        """From the bar's start to its close: the time spent embedding and committing, model loading excluded."""
        return (self.finished or time.perf_counter()) - self.started


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(dt.timedelta(seconds=round(seconds)))


def write_summary(run: RunFolder, *, engine: str, started: float, progress: Progress, listing: Listing) -> dict:
    """RUN/summary.json: the run's counts (all committed shards) and this invocation's rates, two of each:

    - ``embedding_*``: over the time the progress bar ran (the rates it shows), from the first input
      handed to the loaded model to the last commit;
    - ``panoramas_per_s``, ``views_per_s``: over ``wall_s``, the whole invocation, model loading included.
    """
    shards = run.manifest["shards"].values()
    wall = time.perf_counter() - started
    embedding = progress.seconds() if progress.panoramas + progress.errors else 0.0
    summary = {
        "run": str(run.out),
        "complete": not run.pending(),
        "engine": engine,
        "config_hash": run.manifest["config_hash"],
        "inputs": run.manifest["inputs"]["count"],
        "shards": run.shards(),
        "shards_done": len(run.manifest["shards"]),
        "panoramas": sum(s["panoramas"] for s in shards),
        "views": sum(s["views"] for s in shards),
        "quarantined": sum(s["quarantined"] for s in shards),
        "metadata": {"rows": listing.metadata_rows, "rows_without_input": listing.metadata_unmatched,
                     "inputs_without_metadata": listing.inputs_without_metadata},
        "this_invocation": {
            "panoramas": progress.panoramas, "views": progress.views, "quarantined": progress.errors,
            "wall_s": round(wall, 3), "panoramas_per_s": progress.panoramas / wall, "views_per_s": progress.views / wall,
            "embedding_s": round(embedding, 3),
            "embedding_panoramas_per_s": progress.panoramas / embedding if embedding else 0.0,
            "embedding_views_per_s": progress.views / embedding if embedding else 0.0,
        },
        "finished_at": _now(),
    }
    write_json_atomic(run.out / SUMMARY, summary)
    return summary


# -- the local job ----------------------------------------------------------------------------------


def prepare(dump, out, *, config: EngineConfig, metadata: Sequence = (), shard_size: int = DEFAULT_SHARD_SIZE,
            north_up: bool = False) -> tuple[RunFolder, Listing, dict]:
    """The run folder (not yet opened), the inputs and the settings' fingerprint: what the local job and
    the Ray job both do first."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    listing = list_inputs(dump, metadata)
    fingerprint = config_fingerprint(config, north_up=north_up, shard_size=shard_size)
    run = RunFolder(out)
    return run, listing, fingerprint


def ingest(dump, out, *, config: EngineConfig | None = None, engine=None, metadata: Sequence = (),
           shard_size: int = DEFAULT_SHARD_SIZE, north_up: bool = False, quiet: bool = False,
           verify: bool = False, hash_inputs: bool = False) -> dict:
    """Embed every input of ``dump`` into the run folder ``out``, resuming it if it exists; returns the summary.

    Pass ``config`` (an Engine is built, after the run folder is checked) or an ``engine`` to reuse.
    ``verify`` checks every committed part against its sha256 (sizes are always checked) and redoes
    the shards that differ; ``hash_inputs`` makes a new run compare its inputs by content rather than
    by size and modification time. Raises ``RunMismatchError`` when ``out`` was started with other
    settings or inputs (unless it has no committed shard), ``RunFolderError`` for a damaged manifest,
    ``RunWriteError`` when the folder cannot be written.
    """
    started = time.perf_counter()
    if engine is None and config is None:
        raise ValueError("pass config or engine")
    config = engine.config if engine is not None else config
    run, listing, fingerprint = prepare(dump, out, config=config, metadata=metadata, shard_size=shard_size, north_up=north_up)
    with run.lock():
        run.open(listing, fingerprint, dump=os.fspath(Path(dump).resolve()), engine_config=config,
                 hash_inputs=hash_inputs, verify=verify)
        pending = run.pending()
        if pending and engine is None:
            engine = make_engine(config)
        progress = Progress(sum(len(shard_items(listing, run, k)) for k in pending), run.shards(), run.shards() - len(pending), quiet=quiet)
        try:
            if pending:
                _embed_shards(engine, run, listing, pending, north_up=north_up, progress=progress)
        finally:
            progress.close()
        return write_summary(run, engine="local", started=started, progress=progress, listing=listing)


def shard_items(listing: Listing, run: RunFolder, shard: int) -> list[InputItem]:
    """Shard ``shard``: its fixed slice of the inputs sorted by id."""
    size = run.manifest["config"]["shard_size"]
    return listing.items[shard * size : (shard + 1) * size]


def _embed_shards(engine, run: RunFolder, listing: Listing, pending: list[int], *, north_up: bool, progress: Progress) -> None:
    """One continuous embed_iter over all pending shards, so the pipeline never drains at a shard's
    end; each finished shard is written and committed by a single writer thread while the model runs on."""
    context = run.table_context()
    stream = embed_in_order(engine, itertools.chain.from_iterable(shard_items(listing, run, k) for k in pending), north_up)

    def commit(shard: int, outcomes: list, seconds: float) -> None:
        entry = build_shard(run, shard, outcomes, north_up=north_up, context=context, seconds=seconds)
        run.commit(entry)
        progress.shard_done(entry)

    with contextlib.closing(stream), ThreadPoolExecutor(1, thread_name_prefix="mimetic-commit") as writer:
        in_flight: Future | None = None
        for shard in pending:
            began = time.perf_counter()
            outcomes = []
            for item, result in itertools.islice(stream, len(shard_items(listing, run, shard))):
                outcomes.append((item, result))
                ok = result.error is None
                progress.advance(int(ok), len(result.views) if ok else 0, int(not ok))
            if in_flight is not None:
                in_flight.result()  # one shard in the writer at a time: memory stays flat, commits stay in order
            in_flight = writer.submit(commit, shard, outcomes, time.perf_counter() - began)
        if in_flight is not None:
            in_flight.result()
