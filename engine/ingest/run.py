"""The run folder: its manifest (checked when read), atomic writes, the settings' fingerprint, commits."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine import __version__
from engine.config import EngineConfig
from engine.ingest.inputs import (
    COMPARISONS,
    LEGACY_COMPARISON,
    InputError,
    Listing,
    RunFolderError,
    RunMismatchError,
    RunWriteError,
)
from engine.ingest.tables import SCHEMAS

TABLES = ("panoramas", "views", "quarantine")
MANIFEST = "manifest.json"
LISTING = "listing.parquet"
SUMMARY = "summary.json"
FORMAT = 1


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


def config_fingerprint(config: EngineConfig, *, north_up: bool, shard_size: int, thumbnails: int | None = None,
                       captions=None, precision: str | None = None) -> dict:
    """Everything that changes what a shard holds: model and weights, views, vocabularies, code version,
    the thumbnails' size and the captioner (``captions``, a CaptionSettings: its folder and files' size,
    decoding, flavours). Those two are keys only when the run asks for them, so runs without them hash as before.

    Batch size, device, decode workers, the decoded-bytes budget (``max_decode_mib``) and the engine
    (local or Ray) change how fast, not what, so they may differ between a run and its resumption.
    ``precision`` is what ``config.precision`` resolves to where the shards are made (bf16, say, for
    auto on a CPU with native bf16): a run moved to a CPU where auto means fp32 is not resumed with the
    other precision (``prepare`` resolves it; a Ray run resolves it once for all its actors).
    """
    from engine.views import view_set
    from engine.vocab import load_vocabulary

    views = [{k: getattr(v, k) for k in ("yaw", "pitch", "roll", "fov")} for v in view_set(config.views)]
    vocabularies = {}
    for name in config.vocabularies:
        vocabulary = load_vocabulary(name)
        vocabularies[vocabulary.name] = hashlib.sha256(f"{vocabulary.template}\n{vocabulary.labels_hash}".encode()).hexdigest()[:16]
    fingerprint = {
        "clip_model": config.clip_model,
        "clip_weights": config.clip_weights,
        "weights_bytes": _weights_bytes(config),
        "random_weights": config.random_weights,
        "seed": config.seed if config.random_weights else None,  # it draws the untrained weights; unused otherwise
        "views": views,
        "vocabularies": vocabularies,
        "top_k": config.top_k,
        "antialias": config.antialias,
        "precision": precision or config.precision,  # bf16 or fp16 embeddings differ from fp32 ones in the 3rd decimal
        "max_pixels": config.max_pixels,
        "north_up": north_up,
        "shard_size": shard_size,
        "mimetic_version": __version__,
        "code_version": _code_version(),
    }
    if thumbnails is not None:
        fingerprint["thumbnails"] = thumbnails
    if captions is not None:
        fingerprint["captions"] = {
            "model": str(Path(captions.model).expanduser().resolve()),
            "model_bytes": _folder_bytes(Path(captions.model).expanduser()),
            "beams": captions.beams, "max_tokens": captions.max_tokens, "flavours": list(captions.flavours),
        }
    return fingerprint


def _weights_bytes(config: EngineConfig) -> int | None:
    """Size of the checkpoint file (or the local-dir folder's files): a replaced checkpoint shows."""
    path = Path(config.clip_model.removeprefix("local-dir:")) if config.clip_model.startswith("local-dir:") else None
    if config.clip_weights and Path(config.clip_weights).expanduser().is_file():
        path = Path(config.clip_weights).expanduser()
    return _folder_bytes(path)


def _folder_bytes(path: Path | None) -> int | None:
    """A file's size, or the total size of a folder's files: a replaced model shows."""
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
