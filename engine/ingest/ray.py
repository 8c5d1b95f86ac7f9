"""The ingest job on Ray Data: the same run folder, manifest, quarantine and resume, scaled out.

    from engine.ingest.ray import ingest_ray
    summary = ingest_ray("rome/", "runs/rome", config=EngineConfig(...), address="auto")

The driver does what the local job does before and after the work (``engine.ingest.job``): it lists the
inputs, opens or checks the run folder, holds its lock, and is the manifest's only writer. In
between, each pending shard is one row of a Ray Dataset, and ``map_batches`` hands it, one shard per
call, to a pool of ``ShardWorker`` actors: one Engine each (and one GPU each on a GPU cluster). An
actor embeds the shard's inputs and writes its parts (``engine.ingest.job.build_shard``: temporary names,
then renames); the driver receives the shard's manifest entry and commits it. A retried or repeated
shard renames identical files over the same names and is committed once, so commits are idempotent
per shard; a kill of anything at any moment leaves only what the local job's resume already cleans.

Ray Data fails a whole job on one bad row by default. Here a bad image never reaches Ray as an
error: the Engine returns it as a failed result, and it goes to the quarantine like in the local
job. A shard that fails as a whole (an actor lost, a bug) is left uncommitted and logged, the rest
go on (``max_errored_blocks``); once they are done, the failed shards are tried once more on a new
actor pool. What still fails is left, and the summary says the run is incomplete: running the same
command again does the missing shards. Retries are made here, per shard, rather than by Ray
restarting actors (``max_restarts=0``): a shard is idempotent, and Ray cannot promise to restart an
actor whose constructor arguments live in its object store, as every Ray Data actor's do (it logs
an error line saying so, ray-project/ray#53727).

Ray's own log lines are kept at warning level and up unless ``verbose``; two notices that only
restate this module's own choices (token authentication on, Ray Data's progress bars off) are
left out.

The run folder must be on a filesystem every node sees, and mimetic must be installed on every node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.config import CaptionSettings, EngineConfig
from engine.ingest.inputs import InputItem
from engine.ingest.job import (
    DEFAULT_SHARD_SIZE,
    Progress,
    build_shard,
    embed_in_order,
    flavour_names,
    load_captioner,
    prepare,
    shard_items,
    with_flavours,
    write_summary,
)
from engine.ingest.run import RunFolder

SHARD_ATTEMPTS = 2  # a shard that failed as a whole is tried once more, on a new actor pool
# Ray notices that restate a choice made here (logger name, message start): not shown unless verbose.
RAY_NOTICES = (
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"),
    ("ray.data._internal.progress", "Progress bars disabled"),
)


class ShardWorker:
    """A Ray Data actor: one Engine, many shards. ``__call__`` takes a batch of shard rows (one, usually)."""

    def __init__(self, config: EngineConfig, out: str, north_up: bool, context: dict, threads: int | None,
                 thumbnails: int | None = None, captions: CaptionSettings | None = None):
        import torch

        from engine.pipeline import Engine

        if threads:
            torch.set_num_threads(threads)  # the actor's share of the node's CPUs, not all of them
        self.engine = Engine(config)
        self.captioner = load_captioner(captions, config)
        self.flavours = flavour_names(captions)
        self.run = RunFolder(out)
        self.thumbnails = thumbnails  # the run's (its manifest's), as the local job reads it
        self.north_up = north_up
        self.context = context

    def __call__(self, batch: dict) -> dict:
        entries = []
        for shard, encoded in zip(batch["shard"], batch["items"], strict=True):
            began = time.perf_counter()
            items = [InputItem(**{**fields, "keys": tuple(fields["keys"])}) for fields in json.loads(encoded)]
            outcomes = list(embed_in_order(self.engine, items, self.north_up, self.thumbnails, self.captioner))
            entry = build_shard(self.run, int(shard), outcomes, north_up=self.north_up, context=self.context,
                                seconds=time.perf_counter() - began, flavours=self.flavours)
            entries.append(json.dumps(entry))
        return {"shard": np.asarray(batch["shard"]), "entry": np.asarray(entries, dtype=object)}


def plan_actors(config: EngineConfig, resources: dict, actors: int | None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the cluster's resources.

    With GPUs (and a device that may use them): one actor per GPU. Without: one actor per 4 CPUs, so
    each Engine's model runs on a few threads rather than many actors fighting over all of them.
    """
    cpus = float(resources.get("CPU", os.cpu_count() or 1))
    gpus = float(resources.get("GPU", 0)) if config.device != "cpu" else 0.0
    if gpus >= 1:
        count = actors or int(gpus)
        return count, max(1.0, float(int(cpus // count))), 1.0
    count = actors or max(1, int(cpus // 4))
    return count, max(1.0, float(int(cpus // count))), 0.0


def actors_precision(config: EngineConfig) -> str:
    """``--precision`` resolved here, for every actor: one precision in a run whatever CPUs its nodes have, and
    the same one a local run resolves, so either may resume the other. A CUDA device resolves as CUDA
    even where this process sees none (a CPU head of a GPU cluster); auto resolves on this machine."""
    import torch

    from engine.models.device import resolve_device, resolve_precision

    device = torch.device("cuda") if config.device.startswith("cuda") else resolve_device(config.device)
    return resolve_precision(config.precision, device)[0]


def ingest_ray(dump, out, *, config: EngineConfig, metadata: Sequence = (), shard_size: int = DEFAULT_SHARD_SIZE,
               north_up: bool = False, quiet: bool = False, verify: bool = False, hash_inputs: bool = False,
               address: str | None = None, actors: int | None = None, verbose: bool = False, thumbnails: int | None = None,
               captions: CaptionSettings | None = None) -> dict:
    """``engine.ingest.job.ingest`` on Ray Data; connects to ``address`` (or the running Ray, or a new local one).

    The Engine settings reach every actor in ``config`` (the decoded-bytes budget, ``max_decode_mib``,
    among them: it holds per actor, for that actor's Engine).
    """
    import ray

    started = time.perf_counter()
    config = dataclasses.replace(with_flavours(config, captions), precision=actors_precision(config))
    run, listing, fingerprint = prepare(dump, out, config=config, metadata=metadata, shard_size=shard_size, north_up=north_up,
                                        thumbnails=thumbnails, captions=captions, precision=config.precision)
    with run.lock():
        run.open(listing, fingerprint, dump=os.fspath(Path(dump).resolve()), engine_config=config,
                 hash_inputs=hash_inputs, verify=verify)
        pending = run.pending()
        shards = {k: shard_items(listing, run, k) for k in pending}
        progress = Progress(sum(map(len, shards.values())), run.shards(), run.shards() - len(pending),
                            quiet=quiet, label="ingest (ray)")
        owns_ray = False
        try:
            with _ray_logs(verbose):
                if shards and not ray.is_initialized():
                    ray.init(address=address, include_dashboard=False, log_to_driver=verbose or not quiet,
                             logging_level=logging.INFO if verbose else logging.WARNING)
                    owns_ray = True
                    progress.started = time.perf_counter()  # starting the cluster is not embedding
                for attempt in range(SHARD_ATTEMPTS):
                    rows = [{"shard": k, "items": json.dumps([dataclasses.asdict(i) for i in shards[k]])}
                            for k in run.pending() if k in shards]
                    if not rows:
                        break
                    if attempt:
                        print(f"mimetic ingest: {len(rows)} shards failed as a whole ({_shard_list(r['shard'] for r in rows)}); "
                              "trying them once more", file=sys.stderr)
                    _run_shards(ray, run, rows, config, north_up, actors, progress, captions)
        finally:
            progress.close()
            if owns_ray:
                ray.shutdown()
        run.clean()  # temporary files of retried attempts, parts of shards that failed as a whole
        summary = write_summary(run, engine="ray", started=started, progress=progress, listing=listing)
    missing = run.pending()
    if missing:
        print(f"mimetic ingest: {len(missing)} shards failed as a whole ({_shard_list(missing)}); "
              "run the same command again to do them", file=sys.stderr)
    return summary


def _shard_list(shards) -> str:
    shards = list(shards)
    return ", ".join(map(str, shards[:10])) + (", ..." if len(shards) > 10 else "")


class _Notices(logging.Filter):
    """Drops the records of RAY_NOTICES."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name == name and message.startswith(start) for name, start in RAY_NOTICES)


@contextlib.contextmanager
def _ray_logs(verbose: bool):
    """Ray's own log lines at warning level and up while the job runs, unless ``verbose``.

    ``ray.init(logging_level=...)`` sets Ray core's level; Ray Data has a console handler of its own,
    at INFO. Both are put back afterwards: the caller's process may use Ray for more than this.
    """
    if verbose:
        yield
        return
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    notices = _Notices()
    emitters = [logging.getLogger(name) for name, _ in RAY_NOTICES]
    consoles = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    levels = [h.level for h in consoles]
    for logger in emitters:
        logger.addFilter(notices)
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for logger in emitters:
            logger.removeFilter(notices)
        for handler, level in zip(consoles, levels, strict=True):
            handler.setLevel(level)


def _run_shards(ray, run: RunFolder, rows: list[dict], config: EngineConfig, north_up: bool, actors: int | None,
                progress: Progress, captions: CaptionSettings | None = None) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    count, cpus, gpus = plan_actors(config, ray.cluster_resources(), actors)
    count = min(count, len(rows))
    context = DataContext.get_current()
    saved = context.max_errored_blocks, context.enable_progress_bars
    context.max_errored_blocks = -1  # a shard that fails as a whole must not fail the others (see the docstring)
    context.enable_progress_bars = False  # ours counts panoramas; Ray's would count shards, interleaved
    try:
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardWorker,
            fn_constructor_kwargs={"config": config, "out": str(run.out), "north_up": north_up,
                                   "context": run.table_context(), "threads": int(cpus),
                                   "thumbnails": run.manifest["config"].get("thumbnails"), "captions": captions},
            batch_size=1,
            compute=ActorPoolStrategy(size=count),
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=0,  # shards are retried by ingest_ray, not actors by Ray (see the module's docstring)
        )
        for row in dataset.iter_rows():
            entry = json.loads(row["entry"])
            if str(entry["shard"]) in run.manifest["shards"]:
                continue  # a shard reported twice (a retry) is committed once
            run.commit(entry)
            progress.advance(entry["panoramas"], entry["views"], entry["quarantined"])
            progress.shard_done(entry)
    finally:
        context.max_errored_blocks, context.enable_progress_bars = saved
