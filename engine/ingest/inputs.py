"""The inputs of an ingest: a dump's images (a folder, WebDataset tars or a listing file), their metadata and its canonical fields."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
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


def finite_number(value) -> float | None:
    """A finite float from a metadata value (a number or its text), or None: booleans, blanks, text, NaN and inf."""
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
    lat, lon = finite_number(_first(meta, LAT_COLUMNS)), finite_number(_first(meta, LON_COLUMNS))
    geometry = meta.get("geometry") or meta.get("computed_geometry")
    coordinates = geometry.get("coordinates") if isinstance(geometry, dict) and geometry.get("type") == "Point" else None
    if (lat is None or lon is None) and isinstance(coordinates, list) and len(coordinates) >= 2:
        lon, lat = finite_number(coordinates[0]), finite_number(coordinates[1])
    if lat is not None and not -90 <= lat <= 90:
        lat = None
    if lon is not None and not -180 <= lon <= 180:
        lon = None
    heading = finite_number(_first(meta, HEADING_COLUMNS))
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
    number = finite_number(value)
    if number is None or (isinstance(value, str) and not value.strip().lstrip("-").replace(".", "", 1).isdigit()):
        return str(value)
    seconds = number / 1000.0 if abs(number) >= 1e11 else number
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(value)
