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
    RUN/views/part-NNNNNN.parquet       id, view, yaw, pitch, roll, fov, pano_yaw, bearing, lat, lon, embedding, labels,
                                        caption and prompt (with --captions; null otherwise)
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
import dataclasses
import datetime as dt
import itertools
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from engine.config import DEFAULT_SHARD_SIZE, CaptionSettings, EngineConfig
from engine.ingest.inputs import HEADING_COLUMNS, InputItem, Listing, canonical_fields, list_inputs
from engine.ingest.run import SUMMARY, RunFolder, _now, config_fingerprint, write_json_atomic
from engine.ingest.tables import shard_tables, yaw_offset

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


def embed_in_order(engine, items: Iterable[InputItem], north_up: bool, thumbnails: int | None = None,
                   captioner=None) -> Iterator[tuple[InputItem, object]]:
    """(item, EmbedResult) for every item, in order, through one continuous ``Engine.embed_iter``
    (with a JPEG thumbnail per view, ``thumbnails`` pixels wide, when asked for; and a caption per view
    with ``captioner``).

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

    results = engine.embed_iter(feed(), thumbnails=thumbnails, captioner=captioner)
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


def build_shard(run: RunFolder, shard: int, outcomes: list, *, north_up: bool, context: dict, seconds: float,
                flavours: Sequence[str] = ()) -> dict:
    """Write shard ``shard``'s parts (steps 1 and 2) and return its manifest entry (for step 3)."""
    tables = shard_tables(shard, outcomes, north_up, context, flavours)
    parts = run.write_parts(shard, tables)
    items = [item for item, _ in outcomes]
    return {
        "shard": shard, "first": items[0].id, "last": items[-1].id, "inputs": len(items),
        "panoramas": tables["panoramas"].num_rows, "views": tables["views"].num_rows,
        "quarantined": tables["quarantine"].num_rows, "files": list(parts), "parts": parts,
        "seconds": round(seconds, 3), "committed_at": _now(),
    }


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


def flavour_names(captions: CaptionSettings | None) -> tuple[str, ...]:
    """The flavour vocabularies' names (what the Engine's readings are keyed by), in order."""
    from engine.vocab import load_vocabulary

    return tuple(load_vocabulary(entry).name for entry in captions.flavours) if captions else ()


def with_flavours(config: EngineConfig, captions: CaptionSettings | None) -> EngineConfig:
    """The config with the captions' flavour vocabularies among its own, so the Engine reads them."""
    from engine.vocab import load_vocabulary

    if captions is None:
        return config
    have = {load_vocabulary(entry).name for entry in config.vocabularies}
    missing = tuple(entry for entry, name in zip(captions.flavours, flavour_names(captions), strict=True) if name not in have)
    return dataclasses.replace(config, vocabularies=(*config.vocabularies, *missing)) if missing else config


def load_captioner(captions: CaptionSettings | None, config: EngineConfig):
    from engine.models.caption import Captioner

    if captions is None:
        return None
    return Captioner(captions.model, device=config.device, precision=config.precision, beams=captions.beams,
                     max_tokens=captions.max_tokens)


def prepare(dump, out, *, config: EngineConfig, metadata: Sequence = (), shard_size: int = DEFAULT_SHARD_SIZE,
            north_up: bool = False, thumbnails: int | None = None, captions: CaptionSettings | None = None,
            precision: str | None = None) -> tuple[RunFolder, Listing, dict]:
    """The run folder (not yet opened), the inputs and the settings' fingerprint: what the local job and
    the Ray job both do first. ``precision``: what the shards' engine resolves ``--precision`` to; by
    default what an Engine of ``config`` resolves it to here, known before any model loads."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if thumbnails is not None and (isinstance(thumbnails, bool) or not isinstance(thumbnails, int) or thumbnails <= 0):
        raise ValueError(f"thumbnails must be a width in pixels (a positive integer), got {thumbnails!r}")
    listing = list_inputs(dump, metadata)
    if precision is None:
        from engine.models.device import resolve_device, resolve_precision

        precision = resolve_precision(config.precision, resolve_device(config.device))[0]
    fingerprint = config_fingerprint(config, north_up=north_up, shard_size=shard_size, thumbnails=thumbnails, captions=captions,
                                     precision=precision)
    run = RunFolder(out)
    return run, listing, fingerprint


def ingest(dump, out, *, config: EngineConfig | None = None, engine=None, metadata: Sequence = (),
           shard_size: int = DEFAULT_SHARD_SIZE, north_up: bool = False, quiet: bool = False,
           verify: bool = False, hash_inputs: bool = False, thumbnails: int | None = None,
           captions: CaptionSettings | None = None) -> dict:
    """Embed every input of ``dump`` into the run folder ``out``, resuming it if it exists; returns the summary.

    Pass ``config`` (an Engine is built, after the run folder is checked) or an ``engine`` to reuse.
    ``captions`` also captions every view, with its interrogator prompt (``caption`` and ``prompt`` in the
    views table); the flavours join the vocabularies read, and the captioner is part of the fingerprint.
    ``verify`` checks every committed part against its sha256 (sizes are always checked) and redoes
    the shards that differ; ``hash_inputs`` makes a new run compare its inputs by content rather than
    by size and modification time. ``thumbnails``: keep a JPEG per view, this many pixels wide, in the
    views table's ``thumbnail`` column (what ``mimetic report`` shows). Raises ``RunMismatchError`` when ``out`` was started with other
    settings or inputs (unless it has no committed shard), ``RunFolderError`` for a damaged manifest,
    ``RunWriteError`` when the folder cannot be written.
    """
    started = time.perf_counter()
    if engine is None and config is None:
        raise ValueError("pass config or engine")
    if engine is not None:
        for name in flavour_names(captions):
            if name not in engine.vocabularies:
                raise ValueError(f"flavour vocabulary {name!r} is not among the engine's vocabularies ({', '.join(engine.vocabularies)})")
    config = engine.config if engine is not None else with_flavours(config, captions)
    run, listing, fingerprint = prepare(dump, out, config=config, metadata=metadata, shard_size=shard_size, north_up=north_up,
                                        thumbnails=thumbnails, captions=captions,
                                        precision=engine.clip.precision if engine is not None else None)
    with run.lock():
        run.open(listing, fingerprint, dump=os.fspath(Path(dump).resolve()), engine_config=config,
                 hash_inputs=hash_inputs, verify=verify)
        pending = run.pending()
        if pending and engine is None:
            from engine.pipeline import Engine

            # --random-weights draws from config.seed (engine.models.clip), which the fingerprint records:
            # a resumed run, a Ray actor and a query all build this same model.
            engine = Engine(config)
        captioner = load_captioner(captions, config) if pending else None
        progress = Progress(sum(len(shard_items(listing, run, k)) for k in pending), run.shards(), run.shards() - len(pending), quiet=quiet)
        try:
            if pending:
                _embed_shards(engine, run, listing, pending, north_up=north_up, progress=progress, captioner=captioner,
                              flavours=flavour_names(captions))
        finally:
            progress.close()
        return write_summary(run, engine="local", started=started, progress=progress, listing=listing)


def shard_items(listing: Listing, run: RunFolder, shard: int) -> list[InputItem]:
    """Shard ``shard``: its fixed slice of the inputs sorted by id."""
    size = run.manifest["config"]["shard_size"]
    return listing.items[shard * size : (shard + 1) * size]


def _embed_shards(engine, run: RunFolder, listing: Listing, pending: list[int], *, north_up: bool, progress: Progress,
                  captioner=None, flavours: Sequence[str] = ()) -> None:
    """One continuous embed_iter over all pending shards, so the pipeline never drains at a shard's
    end; each finished shard is written and committed by a single writer thread while the model runs on."""
    context = run.table_context()
    thumbnails = run.manifest["config"].get("thumbnails")
    stream = embed_in_order(engine, itertools.chain.from_iterable(shard_items(listing, run, k) for k in pending), north_up,
                            thumbnails, captioner)

    def commit(shard: int, outcomes: list, seconds: float) -> None:
        entry = build_shard(run, shard, outcomes, north_up=north_up, context=context, seconds=seconds, flavours=flavours)
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
