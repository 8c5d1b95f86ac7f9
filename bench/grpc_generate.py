"""
Dream and Caption over gRPC against in-process, with the tiny models, side by side in one run
==============================================================================================

Part of ``python -m bench.grpc`` (``--only dream,caption``). On the same JPEG bytes (louvre.jpg at
1024 x 512, turned to several yaws), with the tiny CLIP, tiny Stable Diffusion and tiny BLIP that
``mimetic models make-tiny`` writes (their throughput is not SD 1.5's or BLIP-base's: what is measured
is what the service adds around a model call):

* in-process: ``engine.dream.dream.dream`` / ``engine.dream.interrogate.interrogate``, as ``mimetic
  dream`` and ``mimetic caption`` run them: the peer;
* gRPC, 1 stream: ``MimeticClient.dream`` / ``.caption`` against ``mimetic serve --sd-model
  --caption-model`` in a subprocess on loopback; ratio to in-process (target >= 0.9);
* two streams sending one item at a time (client window 1), at once, so that the server batches them
  into shared model calls, against the same items served one stream at a time.

Images (views) per second over a whole pass, median of repeats, passes taken in turn; the ratio of the
fastest passes is printed too, since other jobs on a shared machine only ever add time. The in-process
peer runs in a worker thread, as the server's models do (see ``in_thread``).
"""

from __future__ import annotations

import io
import statistics
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from bench.grpc import TARGET_RATIO, ServerProcess, interleaved_seconds
from engine import Engine, EngineConfig, Panorama
from engine.serve.client import MimeticClient

FLAVOURS = ("mediums", "movements", "styles")


def small_panoramas(path: Path, count: int, width: int = 1024) -> list[bytes]:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB").resize((width, width // 2), Image.Resampling.BILINEAR))
    blobs = []
    for k in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(pixels, k * width // count, axis=1)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def in_thread(work, *args) -> None:
    """``work(*args)`` in a worker thread, as the server runs its models. On this machine a model call in
    the main thread, after the Numba kernel has run there, was many times slower than the same call in
    another thread (seen with the tiny BLIP: 20 s against 0.6 s), which would measure that, not gRPC."""
    failure = []

    def run():
        try:
            work(*args)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def generate_bench(args, which: set[str]) -> dict:
    from engine.dream.dream import dream
    from engine.dream.interrogate import interrogate
    from engine.dream.params import DreamParams
    from engine.models.caption import Captioner
    from engine.models.diffusion import Dreamer
    from engine.models.tiny import make_tiny_clip
    from engine.models.tiny_caption import make_tiny_caption
    from engine.models.tiny_sd import make_tiny_sd

    count = args.panoramas or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    blobs = small_panoramas(args.pano, count)
    params = DreamParams(prompt="a photograph of a street", steps=8, strength=0.75, seed=1)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip, sd, caption = f"local-dir:{make_tiny_clip(folder)}", str(make_tiny_sd(folder)), str(make_tiny_caption(folder))
        engine = Engine(EngineConfig(clip_model=clip, views="ring4", vocabularies=FLAVOURS))
        dreamer, captioner = Dreamer(sd), Captioner(caption)
        views = count * len(engine.views)
        server = ServerProcess(64, args.max_delay_ms, args.max_in_flight, models=(
            "--clip-model", clip, "--views", "ring4", "--vocabularies", ",".join(FLAVOURS), "--sd-model", sd,
            "--caption-model", caption, "--max-dream-delay-ms", "50"))
        try:
            client = MimeticClient(server.address)
            singles = [MimeticClient(server.address, max_in_flight=1) for _ in range(2)]
            client.info()

            def panoramas(share=slice(None)):
                return [Panorama(id=f"p{k}", data=blob) for k, blob in list(enumerate(blobs))[share]]

            def checked(results):
                assert all(r.error is None for r in results), [r.error for r in results if r.error]

            calls = {
                "dream": (lambda items: checked(dream(engine, dreamer, items, params)),
                          lambda c, items: checked(list(c.dream(items, params)))),
                "caption": (lambda items: checked(interrogate(engine, captioner, items, FLAVOURS)),
                            lambda c, items: checked(list(c.caption(items, flavours=list(FLAVOURS))))),
            }
            out = {}
            for name in ("dream", "caption"):
                if name not in which:
                    continue
                local, remote = calls[name]

                def together(remote=remote):  # two streams at once, one item in flight each: batched by the server
                    threads = [threading.Thread(target=remote, args=(singles[i], panoramas(slice(i, None, 2)))) for i in range(2)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()

                def one_at_a_time(remote=remote):
                    for i in range(2):
                        remote(singles[i], panoramas(slice(i, None, 2)))

                runs = {"in_process": lambda local=local: in_thread(local, panoramas()), "grpc_1_stream": lambda remote=remote: remote(client, panoramas()),
                        "grpc_2_streams_batched": together, "grpc_2_streams_one_at_a_time": one_at_a_time}
                rows = {}
                for path, samples in interleaved_seconds(runs, repeats).items():
                    seconds = statistics.median(samples)
                    rows[path] = {"s": seconds, "samples_s": samples, "views_per_s": views / seconds}
                base, best_base = rows["in_process"]["views_per_s"], min(rows["in_process"]["samples_s"])
                for row in rows.values():
                    row["ratio_to_in_process"] = row["views_per_s"] / base
                    row["best_ratio_to_in_process"] = best_base / min(row["samples_s"])  # fastest pass against fastest pass
                out[name] = {"rows": rows, "batched_over_one_at_a_time":
                             rows["grpc_2_streams_batched"]["views_per_s"] / rows["grpc_2_streams_one_at_a_time"]["views_per_s"]}
                _print(name, rows, count, len(engine.views), out[name]["batched_over_one_at_a_time"])
            for c in (client, *singles):
                c.close()
        finally:
            server.stop()
    out["setup"] = {"panoramas": count, "views_per_panorama": 4, "repeats": repeats, "dream_steps": params.steps,
                    "dream_strength": params.strength, "models": "tiny CLIP, tiny SD, tiny BLIP (mimetic models make-tiny)"}
    return out


def _print(name: str, rows: dict, count: int, per: int, batched: float) -> None:
    print(f"\n{name}: tiny models, {count} panoramas x {per} views")
    print(f"{'path':<30}{'s/pass':>9}{'views/s':>10}{'ratio':>8}{'best ratio':>12}   samples (s)")
    for path, row in rows.items():
        samples = " ".join(f"{x:.2f}" for x in row["samples_s"])
        print(f"{path:<30}{row['s']:>9.2f}{row['views_per_s']:>10.1f}{row['ratio_to_in_process']:>8.2f}"
              f"{row['best_ratio_to_in_process']:>12.2f}   {samples}")
    ratio = rows["grpc_1_stream"]["ratio_to_in_process"]
    print(f"{name} over gRPC keeps {ratio:.2f} of in-process throughput, median against median (target >= {TARGET_RATIO}) "
          f"{'ok' if ratio >= TARGET_RATIO else 'MISS'}; two streams batched together: {batched:.2f}x one stream at a time")
