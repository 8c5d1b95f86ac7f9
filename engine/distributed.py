"""The ingest job on Ray Data: the same run folder, manifest, quarantine and resume, scaled out.

    from engine.distributed import ingest_ray
    summary = ingest_ray("rome/", "runs/rome", config=EngineConfig(...), address="auto")

The driver does what the local job does before and after the work (``engine.ingest``): it lists the
inputs, opens or checks the run folder, holds its lock, and is the manifest's only writer. In
between, each pending shard is one row of a Ray Dataset, and ``map_batches`` hands it, one shard per
call, to a pool of ``ShardWorker`` actors: one Engine each (and one GPU each on a GPU cluster). An
actor embeds the shard's inputs and writes its parts (``engine.ingest.build_shard``: temporary names,
then renames); the driver receives the shard's manifest entry and commits it. A retried or repeated
shard renames identical files over the same names and is committed once, so commits are idempotent
per shard; a kill of anything at any moment leaves only what the local job's resume already cleans.

Ray Data fails a whole job on one bad row by default. Here a bad image never reaches Ray as an
error: the Engine returns it as a failed result, and it goes to the quarantine like in the local
job. A shard that fails as a whole (an actor lost for good, a bug) is left uncommitted and logged,
the rest go on (``max_errored_blocks``), and the summary says the run is incomplete: running the
same command again does the missing shards.

The run folder must be on a filesystem every node sees, and mimetic must be installed on every node.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.ingest import (
    DEFAULT_SHARD_SIZE,
    InputItem,
    Progress,
    RunFolder,
    build_shard,
    embed_in_order,
    make_engine,
    prepare,
    shard_items,
    write_summary,
)


class ShardWorker:
    """A Ray Data actor: one Engine, many shards. ``__call__`` takes a batch of shard rows (one, usually)."""

    def __init__(self, config: EngineConfig, out: str, north_up: bool, context: dict, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)  # the actor's share of the node's CPUs, not all of them
        self.engine = make_engine(config)
        self.run = RunFolder(out)
        self.north_up = north_up
        self.context = context

    def __call__(self, batch: dict) -> dict:
        entries = []
        for shard, encoded in zip(batch["shard"], batch["items"], strict=True):
            began = time.perf_counter()
            items = [InputItem(**{**fields, "keys": tuple(fields["keys"])}) for fields in json.loads(encoded)]
            outcomes = list(embed_in_order(self.engine, items, self.north_up))
            entry = build_shard(self.run, int(shard), outcomes, north_up=self.north_up, context=self.context,
                                seconds=time.perf_counter() - began)
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


def ingest_ray(dump, out, *, config: EngineConfig, metadata: Sequence = (), shard_size: int = DEFAULT_SHARD_SIZE,
               north_up: bool = False, quiet: bool = False, address: str | None = None, actors: int | None = None) -> dict:
    """``engine.ingest.ingest`` on Ray Data; connects to ``address`` (or the running Ray, or a new local one)."""
    import ray

    started = time.perf_counter()
    run, listing, fingerprint = prepare(dump, out, config=config, metadata=metadata, shard_size=shard_size, north_up=north_up)
    with run.lock():
        run.open(listing, fingerprint, dump=os.fspath(Path(dump).resolve()), engine_config=config)
        pending = run.pending()
        shards = {k: shard_items(listing, run, k) for k in pending}
        rows = [{"shard": k, "items": json.dumps([dataclasses.asdict(i) for i in items])} for k, items in shards.items()]
        progress = Progress(sum(map(len, shards.values())), run.shards(), run.shards() - len(pending),
                            quiet=quiet, label="ingest (ray)")
        owns_ray = False
        try:
            if rows:
                if not ray.is_initialized():
                    ray.init(address=address, include_dashboard=False, log_to_driver=not quiet, logging_level=logging.WARNING)
                    owns_ray = True
                _run_shards(ray, run, rows, config, north_up, actors, progress)
        finally:
            progress.close()
            if owns_ray:
                ray.shutdown()
        run.clean()  # temporary files of retried attempts, parts of shards that failed as a whole
        summary = write_summary(run, engine="ray", started=started, progress=progress, listing=listing)
    missing = run.pending()
    if missing:
        print(f"mimetic ingest: {len(missing)} shards failed as a whole ({', '.join(map(str, missing[:10]))}"
              f"{', ...' if len(missing) > 10 else ''}); run the same command again to do them", file=sys.stderr)
    return summary


def _run_shards(ray, run: RunFolder, rows: list[dict], config: EngineConfig, north_up: bool, actors: int | None,
                progress: Progress) -> None:
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
                                   "context": run.table_context(), "threads": int(cpus)},
            batch_size=1,
            compute=ActorPoolStrategy(size=count),
            num_cpus=cpus,
            num_gpus=gpus,
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
