"""
gRPC service vs in-process Engine: the same panoramas, the same model, side by side in one run
==============================================================================================

What this measures, on the same JPEG bytes (louvre.jpg re-encoded at several yaws, so no two inputs
are identical), with ViT-B-32 with random weights (the throughput is the architecture's):

* in-process: ``Engine.embed`` in this process, the peer;
* gRPC, 1 stream and 4 streams: ``mimetic serve`` in a subprocess on loopback, fed by
  ``MimeticClient.embed`` from this process (4 streams: 4 clients in 4 threads, a quarter each).

Throughput is views/s over a whole pass (median of repeats, the passes of the three paths taken in
turn), with the ratio to in-process (target >= 0.9); the ratio of the fastest passes is printed too,
since other jobs on a shared machine only ever add time. Latency is per item at a fixed offered load, a fraction of the in-process throughput: items
are released on a fixed schedule (open loop) and each one's time from release to result is taken;
p50 and p99 are reported (with few items, p99 is close to the maximum; the count is printed). The
in-process Engine is fed the same schedule through ``embed_iter``, which waits to fill a group
before it runs one; the server's batcher waits at most ``--max-delay-ms``.

    python -m bench.grpc [--quick] [--only embed,dream,caption] [--panoramas N] [--load 0.5] [--out DIR]

Dream and Caption (``bench.grpc_generate``) are measured the same way with the tiny models (``mimetic
models make-tiny``): ``mimetic dream``'s and ``mimetic caption``'s in-process calls against
``MimeticClient.dream`` / ``.caption`` on ``mimetic serve --sd-model --caption-model``, and two streams
sending one item at a time, batched together by the server, against the same items served one stream
at a time.

(Run it as a module: ``python bench/grpc.py`` would put bench/ first on sys.path, and this file
would hide the grpc package.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench._results import OUT_HELP, versions, write_result
from bench.clip import DEFAULT_PANO, jpeg_panoramas
from bench.reproject import cpu_model
from engine import Engine, EngineConfig, Panorama
from engine.serve.client import MimeticClient

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TARGET_RATIO = 0.9


class ServerProcess:
    """``mimetic serve`` in a subprocess (its own interpreter, as in production), on a free loopback port."""

    def __init__(self, batch_size: int, max_delay_ms: float, max_in_flight: int, models=("--clip-model", "ViT-B-32", "--random-weights")):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.serve.cli", "serve", *models,
             "--batch-size", str(batch_size), "--max-batch", str(batch_size), "--max-delay-ms", str(max_delay_ms),
             "--max-in-flight", str(max_in_flight), "--port", "0", "--metrics-port", "0"],
            cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True,
        )
        lines = []
        while not any("serving" in line for line in lines):
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError("the server did not start:\n" + "".join(lines))
            lines.append(line)
        listening = next(line for line in lines if "listening on" in line)
        self.address = listening.split("listening on ")[1].split(",")[0].split(";")[0]
        self.metrics_port = int(listening.split("metrics on http://")[1].split("/")[0].rsplit(":", 1)[1])
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained

    def metrics(self) -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def interleaved_seconds(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per pass of each run, taken in turn (a, b, c, a, b, c, ...) so that any other load on the
    machine falls on all of them alike; one warm-up pass each first (allocator, threads, connections)."""
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return samples


def grpc_pass(address: str, blobs: list[bytes], streams: int):
    """One pass: ``streams`` clients in parallel, each with its share of the panoramas."""
    clients = [MimeticClient(address) for _ in range(streams)]
    for client in clients:
        client.info()  # connected before timing

    def run():
        failures = []

        def one(index: int):
            share = [Panorama(id=f"s{index}-{k}", data=blob) for k, blob in enumerate(blobs[index::streams])]
            results = list(clients[index].embed(share, outputs=["view_embeddings", "pooled", "readings"]))
            failures.extend(r.error for r in results if r.error)
            if len(results) != len(share):
                failures.append(f"stream {index}: {len(results)} results for {len(share)} panoramas")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures

    return run, clients


def paced(blobs: list[bytes], rate: float, sent: dict, prefix: str, start: float):
    """Panoramas released at ``rate`` per second from ``start`` (perf_counter); ``sent[id]`` is each one's release time."""
    for k, blob in enumerate(blobs):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        item_id = f"{prefix}{k}"
        sent[item_id] = time.perf_counter()
        yield Panorama(id=item_id, data=blob)


def percentiles(latencies: list[float]) -> dict:
    values = np.asarray(latencies) * 1e3
    return {"n": len(values), "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "max_ms": float(values.max())}


def latency_in_process(engine: Engine, blobs: list[bytes], rate: float) -> dict:
    sent, latencies = {}, []
    for result in engine.embed_iter(paced(blobs, rate, sent, "l", time.perf_counter())):
        latencies.append(time.perf_counter() - sent[result.id])
    return percentiles(latencies)


def latency_grpc(clients: list[MimeticClient], blobs: list[bytes], rate: float) -> dict:
    streams = len(clients)
    sent, latencies, lock = {}, [], threading.Lock()
    start = time.perf_counter() + 0.1

    def one(index: int):  # stream i releases items i, i + streams, ...: together, the same schedule as one stream
        share = blobs[index::streams]
        schedule = paced(share, rate / streams, sent, f"l{index}-", start + index / rate)
        for result in clients[index].embed(schedule, ordered=False):
            with lock:
                latencies.append(time.perf_counter() - sent[result.id])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return percentiles(latencies)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc", description=__doc__.split("\n\n")[1])
    parser.add_argument("--only", default="embed,dream,caption", help="comma-separated: embed, dream, caption (default all)")
    parser.add_argument("--quick", action="store_true", help="fewer panoramas and repeats")
    parser.add_argument("--panoramas", type=int, default=None, help="panoramas per pass (default 16; 8 with --quick)")
    parser.add_argument("--latency-items", type=int, default=None, help="items per latency run (default 24; 8 with --quick)")
    parser.add_argument("--load", type=float, default=0.5, help="offered load for latency, as a fraction of in-process throughput")
    parser.add_argument("--batch-size", type=int, default=64, help="views per model call, in-process and on the server")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-in-flight", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    parser.add_argument("--pano", type=Path, default=DEFAULT_PANO)
    args = parser.parse_args(argv)
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    result = {"bench": "grpc", "date": dt.date.today().isoformat(), "device": cpu_model()}
    if "embed" in only:
        result.update(embed_bench(args))
    if only & {"dream", "caption"}:
        from bench.grpc_generate import generate_bench

        result["generate"] = generate_bench(args, only & {"dream", "caption"})
    write_result("grpc", result["device"], result["date"], result, args.out)
    return result


def embed_bench(args) -> dict:
    count = args.panoramas or (8 if args.quick else 16)
    latency_items = args.latency_items or (8 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 5)
    load_before = os.getloadavg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights: expected here, said above
        engine = Engine(EngineConfig(clip_model="ViT-B-32", random_weights=True, batch_size=args.batch_size))
    blobs = jpeg_panoramas(args.pano, count)
    views = count * len(engine.views)

    def in_process():
        results = engine.embed(Panorama(id=f"p{k}", data=blob) for k, blob in enumerate(blobs))
        assert all(r.error is None for r in results), [r.error for r in results if r.error]

    server = ServerProcess(args.batch_size, args.max_delay_ms, args.max_in_flight)  # idle while the engine here runs
    try:
        runs, client_sets = {"in_process": in_process}, {}
        for streams in (1, 4):
            runs[f"grpc_{streams}_stream{'s' if streams > 1 else ''}"], client_sets[streams] = grpc_pass(server.address, blobs, streams)
        rows = {}
        for name, samples in interleaved_seconds(runs, repeats).items():
            seconds = statistics.median(samples)
            rows[name] = {"s": seconds, "samples_s": samples, "views_per_s": views / seconds}
        scraped = server.metrics()

        panoramas_per_s = rows["in_process"]["views_per_s"] / len(engine.views)
        rate = args.load * panoramas_per_s
        latency_blobs = jpeg_panoramas(args.pano, latency_items)
        latency = {
            "in_process": latency_in_process(engine, latency_blobs, rate),
            "grpc_1_stream": latency_grpc(client_sets[1], latency_blobs, rate),
            "grpc_4_streams": latency_grpc(client_sets[4], latency_blobs, rate),
        }
        for clients in client_sets.values():
            for client in clients:
                client.close()
    finally:
        server.stop()

    base, best_base = rows["in_process"]["views_per_s"], min(rows["in_process"]["samples_s"])
    for row in rows.values():
        row["ratio_to_in_process"] = row["views_per_s"] / base
        row["best_ratio_to_in_process"] = best_base / min(row["samples_s"])  # fastest pass against fastest pass
    load_after = os.getloadavg()
    device = cpu_model()
    print(f"\n{device}: ViT-B-32 (random weights, {engine.clip.dtype}), {count} panoramas x {len(engine.views)} views, "
          f"batch {args.batch_size}, server max delay {args.max_delay_ms:g} ms, K = {args.max_in_flight}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (other jobs on this machine widen the spread)")
    print(f"{'path':<16}{'s/pass':>9}{'views/s':>10}{'ratio':>8}{'best ratio':>12}   samples (s)")
    for name, row in rows.items():
        samples = " ".join(f"{x:.1f}" for x in row["samples_s"])
        print(f"{name:<16}{row['s']:>9.2f}{row['views_per_s']:>10.1f}{row['ratio_to_in_process']:>8.2f}"
              f"{row['best_ratio_to_in_process']:>12.2f}   {samples}")
    worst = min(row["ratio_to_in_process"] for name, row in rows.items() if name != "in_process")
    print(f"gRPC keeps >= {worst:.2f} of in-process throughput, median against median (target >= {TARGET_RATIO}) "
          f"{'ok' if worst >= TARGET_RATIO else 'MISS'}")
    print(f"\nper-item latency at {rate:.2f} panoramas/s offered ({args.load:g} of in-process throughput), release to result:")
    print(f"{'path':<16}{'n':>4}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in latency.items():
        print(f"{name:<16}{row['n']:>4}{row['p50_ms']:>10.0f}{row['p99_ms']:>10.0f}")
    batches = scraped.get("mimetic_batch_views_count", 0)
    mean_batch = scraped.get("mimetic_batch_views_sum", 0) / batches if batches else None

    return {
        "info": engine.info(),
        "setup": {"panoramas": count, "views_per_panorama": len(engine.views), "batch_size": args.batch_size,
                  "max_delay_ms": args.max_delay_ms, "max_in_flight": args.max_in_flight, "repeats": repeats,
                  "latency_items": latency_items, "offered_load_fraction": args.load, "offered_panoramas_per_s": rate},
        "rows": rows,
        "worst_ratio_to_in_process": worst,
        "load_average_before_after": [load_before, load_after],
        "latency": latency,
        "server_mean_batch_views": mean_batch,
        "versions": versions(("torch", "open_clip_torch", "grpcio", "protobuf", "numba", "diffusers", "transformers")),
    }



if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
