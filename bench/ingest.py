"""
Ingestion: a dump folder -> a run folder of sharded Parquet, against in-process ``Engine.embed``
===============================================================================================

What this measures, side by side in one run, on the same dump (louvre.jpg re-encoded at evenly
spaced yaws, 4096x2048 JPEG files in a folder) and with the same loaded model:

* in-process: ``Engine.embed`` over the files' paths, results kept in memory: the ceiling;
* local ingest: ``engine.ingest.job.ingest`` into a fresh run folder each pass: listing, run folder
  and manifest, then the same Engine, with every shard written to Parquet, fsynced, renamed and
  committed to the manifest (``--shards`` commits per pass, so the cost of exactly-once shows);
* local Ray: ``engine.ingest.ray.ingest_ray`` on a local Ray (started once, outside the timing),
  one actor per 4 CPUs or per GPU. Each pass starts its actors and builds their model, which the
  other two do not pay, so it is also reported as the actors' own rate: views over the seconds
  they spent inside shards (the manifest records them).

All three are sampled round-robin, after a warm-up pass each, and the median pass is reported, as panoramas/s, views/s
and a ratio to in-process. Target: local ingest >= 0.9x in-process. ViT-B-32 with random weights
(the throughput is the architecture's; nothing here needs trained weights). JSON goes to
``bench/runs/`` (or ``--out``).

    python -m bench.ingest [--quick] [--panoramas N] [--shards S] [--no-ray] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench._results import OUT_HELP, versions, write_result
from bench.clip import DEFAULT_PANO, jpeg_panoramas
from bench.reproject import cpu_model
from engine import Engine, EngineConfig, Panorama
from engine.ingest.job import ingest

BENCH_DIR = Path(__file__).resolve().parent
TARGET_FRACTION = 0.9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer panoramas and repeats")
    parser.add_argument("--panoramas", type=int, default=None, help="panoramas in the dump (default 16 on CPU, 512 on CUDA)")
    parser.add_argument("--shards", type=int, default=4, help="shards per pass, i.e. commits (default 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="views per model call (default 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    parser.add_argument("--pano", type=Path, default=DEFAULT_PANO)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    count = args.panoramas or (512 if cuda else (8 if args.quick else 16))
    batch_size = args.batch_size or (1024 if cuda else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    shard_size = -(-count // args.shards)
    config = EngineConfig(clip_model="ViT-B-32", random_weights=True, batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights: expected here, said above
        engine = Engine(config)

    scratch = Path(tempfile.mkdtemp(prefix="mimetic-bench-ingest-"))
    ray_ingest = None
    try:
        dump = scratch / "dump"
        dump.mkdir()
        paths = []
        for k, blob in enumerate(jpeg_panoramas(args.pano, count)):
            paths.append(dump / f"pano-{k:05d}.jpg")
            paths[-1].write_bytes(blob)
        views = count * len(engine.views)
        passes = iter(range(10**6))

        def in_process():
            results = engine.embed(Panorama(id=path.stem, data=str(path)) for path in paths)
            assert all(r.error is None for r in results), [r.error for r in results if r.error]

        def local_ingest():
            out = scratch / f"run-{next(passes)}"
            summary = ingest(dump, out, engine=engine, shard_size=shard_size, quiet=True)
            assert summary["complete"] and summary["panoramas"] == count, summary
            shutil.rmtree(out)

        runners = {"in_process": in_process, "local_ingest": local_ingest}
        ray_ingest = None if args.no_ray else ray_runner(dump, scratch, config, shard_size, count)
        if ray_ingest is not None:
            runners["local_ray"] = ray_ingest
        samples = {name: [] for name in runners}
        for fn in runners.values():
            fn()  # warm-up: Numba, allocator, page cache, Ray's worker processes
        busy = []
        for _ in range(repeats):  # round-robin: a shared machine's load falls on every method alike
            for name, fn in runners.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                actors_busy = fn()
                if cuda:
                    torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - start)
                if name == "local_ray":
                    busy.append(actors_busy)
    finally:
        if ray_ingest is not None:
            ray_ingest.close()
        shutil.rmtree(scratch, ignore_errors=True)

    rows = {}
    for name, times in samples.items():
        s = statistics.median(times)
        rows[name] = {"s": s, "samples_s": times, "panoramas_per_s": count / s, "views_per_s": views / s}
    if busy:
        s = statistics.median(busy)
        rows["local_ray"]["actors"] = ray_ingest.actors
        rows["local_ray_actors_only"] = {"s": s, "samples_s": busy, "panoramas_per_s": count / s, "views_per_s": views / s}
    peer = rows["in_process"]["views_per_s"]
    for row in rows.values():
        row["ratio_to_in_process"] = row["views_per_s"] / peer

    device_name = torch.cuda.get_device_name() if cuda else cpu_model()
    print(f"\n{device_name}: ViT-B-32 (random weights, {engine.clip.dtype}), {count} panoramas (4096x2048 JPEG) x "
          f"{len(engine.views)} views, batch {batch_size}, {args.shards} shards of {shard_size}")
    print(f"{'pipeline':<24}{'s/pass':>9}{'panos/s':>10}{'views/s':>10}{'x in-proc':>11}")
    for name, row in rows.items():
        print(f"{name:<24}{row['s']:>9.2f}{row['panoramas_per_s']:>10.2f}{row['views_per_s']:>10.1f}{row['ratio_to_in_process']:>11.2f}")
    fraction = rows["local_ingest"]["ratio_to_in_process"]
    print(f"local ingest keeps {fraction:.2f} of in-process throughput (target >= {TARGET_FRACTION}) "
          f"{'ok' if fraction >= TARGET_FRACTION else 'MISS'}")

    result = {
        "bench": "ingest",
        "date": dt.date.today().isoformat(),
        "device": device_name,
        "info": engine.info(),
        "setup": {"panoramas": count, "views_per_panorama": len(engine.views), "batch_size": batch_size,
                  "shards": args.shards, "shard_size": shard_size, "repeats": repeats, "pano": str(args.pano),
                  "cpu_count": os.cpu_count()},
        "rows": rows,
        "local_ingest_fraction_of_in_process": fraction,
        "target_fraction": TARGET_FRACTION,
        "versions": versions(("torch", "open_clip_torch", "pyarrow", "ray", "numba")),
    }
    write_result("ingest", device_name, result["date"], result, args.out)
    return result


def ray_runner(*args) -> RayRunner | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("ray is not installed: no Ray rows (pip install 'ray[data]')")
        return None
    return RayRunner(*args)


class RayRunner:
    """One Ray ingest per call into a fresh run folder; returns the actors' busy seconds (their summed
    seconds inside shards over their number: they work in parallel). Ray starts once, untimed."""

    def __init__(self, dump: Path, scratch: Path, config: EngineConfig, shard_size: int, count: int):
        import ray

        self.dump, self.scratch, self.config, self.shard_size, self.count = dump, scratch, config, shard_size, count
        self.owns = not ray.is_initialized()
        if self.owns:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self.passes = 0
        self.actors = None

    def __call__(self) -> float:
        import ray

        from engine.ingest.ray import ingest_ray, plan_actors

        out = self.scratch / f"ray-{self.passes}"
        self.passes += 1
        summary = ingest_ray(self.dump, out, config=self.config, shard_size=self.shard_size, quiet=True)
        assert summary["complete"] and summary["panoramas"] == self.count, summary
        shards = json.loads((out / "manifest.json").read_text())["shards"].values()
        self.actors = min(plan_actors(self.config, ray.cluster_resources(), None)[0], len(shards))
        shutil.rmtree(out)
        return sum(entry["seconds"] for entry in shards) / self.actors

    def close(self) -> None:
        import ray

        if self.owns:
            ray.shutdown()


if __name__ == "__main__":
    main()
