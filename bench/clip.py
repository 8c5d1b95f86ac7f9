"""
CLIP engine: panoramas (JPEG bytes) -> views -> ViT-B-32 embeddings
===================================================================

What this measures, side by side in one run, on the same JPEG bytes (louvre.jpg re-encoded at
several yaws so no two inputs are identical):

* model-only: the image tower on pre-made normalised view tensors, the ceiling for any pipeline;
* engine: ``Engine.embed`` end to end from the JPEG bytes (decode with DCT scaling in a thread
  pool, one reprojection launch per group, normalisation in the kernel, one model call per batch);
* naive: what a clip-retrieval-style script does: PIL decode, py360convert ``e2p`` per view,
  open_clip's preprocess on each view, the model in batches of 32.

ViT-B-32 has random weights (the throughput is the architecture's; nothing here needs trained
weights). Reported: views/s for each, the engine's fraction of model-only throughput (target
>= 0.9) and its speed-up over the naive pipeline. JSON goes to ``bench/runs/`` (or ``--out``).

    python -m bench.clip [--quick] [--panoramas N] [--batch-size B] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._results import OUT_HELP, versions, write_result
from bench.reproject import cpu_model
from engine import Engine, EngineConfig, Panorama
from kernels.geometry import py360convert_fov

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PANO = BENCH_DIR.parents[1] / "shared" / "panoramas" / "louvre.jpg"
TARGET_FRACTION_OF_MODEL = 0.9
TARGET_GPU_VIEWS_PER_S = 15_000  # ViT-B/32, fp16, end to end from JPEG bytes, on an H100 or H200


def jpeg_panoramas(path: Path, count: int) -> list[bytes]:
    """``count`` JPEGs of the panorama turned to evenly spaced yaws (a column roll), quality 90."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    blobs = []
    for k in range(count):
        turned = np.roll(pixels, k * pixels.shape[1] // count, axis=1)
        buffer = io.BytesIO()
        Image.fromarray(turned).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    fn()  # warm-up: JIT compilation, allocator, cuDNN/Triton autotuning
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def naive_pipeline(engine: Engine, blobs: list[bytes]):
    """PIL decode, py360convert per view, open_clip preprocess per view, the model in batches of 32."""
    import open_clip
    import py360convert

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")  # the standard transform only
    size = engine.views[0].width
    fov = py360convert_fov(engine.views[0].fov, size)

    def run():
        batch, outputs = [], []
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                pano = np.asarray(image.convert("RGB"))
            for view in engine.views:
                face = py360convert.e2p(pano, fov, view.yaw, view.pitch, (size, size))
                batch.append(preprocess(Image.fromarray(face)))
                if len(batch) == 32:
                    outputs.append(engine.clip.encode_images(torch.stack(batch).to(engine.device, engine.clip.dtype)))
                    batch = []
        if batch:
            outputs.append(engine.clip.encode_images(torch.stack(batch).to(engine.device, engine.clip.dtype)))
        return outputs

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.clip", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer panoramas and repeats")
    parser.add_argument("--panoramas", type=int, default=None, help="panoramas per pass (default 8 on CPU, 256 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="views per model call (default 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    parser.add_argument("--pano", type=Path, default=DEFAULT_PANO)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    count = args.panoramas or (256 if cuda else (4 if args.quick else 8))
    batch_size = args.batch_size or (1024 if cuda else 64)
    repeats = args.repeats or (2 if args.quick else 3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights: expected here, said above
        engine = Engine(EngineConfig(clip_model="ViT-B-32", random_weights=True, batch_size=batch_size))
    device = engine.device
    blobs = jpeg_panoramas(args.pano, count)
    views = count * len(engine.views)

    # Model-only: the same number of views, already normalised, already on the device.
    h, w = engine.clip.image_size
    ready = torch.randn(views, 3, h, w, device=device, dtype=engine.clip.dtype)

    def model_only():
        return [engine.clip.encode_images(chunk) for chunk in ready.split(batch_size)]

    def end_to_end():
        results = engine.embed(Panorama(id=f"pano-{k}", data=blob) for k, blob in enumerate(blobs))
        assert all(r.error is None for r in results), [r.error for r in results if r.error]

    timings = {
        "model_only": median_seconds(model_only, repeats, device),
        "engine": median_seconds(end_to_end, repeats, device),
    }
    if not cuda or not args.quick:
        timings["naive"] = median_seconds(naive_pipeline(engine, blobs), repeats, device)

    rows = {name: {"s": s, "samples_s": samples, "views_per_s": views / s} for name, (s, samples) in timings.items()}
    fraction = rows["engine"]["views_per_s"] / rows["model_only"]["views_per_s"]
    speedup = rows["engine"]["views_per_s"] / rows["naive"]["views_per_s"] if "naive" in rows else None
    device_name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    print(f"\n{device_name}: ViT-B-32 (random weights, {engine.clip.dtype}), {count} panoramas x {len(engine.views)} views, batch {batch_size}")
    print(f"{'pipeline':<12}{'s/pass':>9}{'views/s':>10}")
    for name, row in rows.items():
        print(f"{name:<12}{row['s']:>9.2f}{row['views_per_s']:>10.1f}")
    print(f"engine keeps {fraction:.2f} of model-only throughput (target >= {TARGET_FRACTION_OF_MODEL})"
          f" {'ok' if fraction >= TARGET_FRACTION_OF_MODEL else 'MISS'}")
    if speedup is not None:
        print(f"engine vs naive (PIL + py360convert + open_clip preprocess): {speedup:.2f}x {'ok' if speedup > 1 else 'MISS'}")
    if cuda:
        ok = rows["engine"]["views_per_s"] >= TARGET_GPU_VIEWS_PER_S
        print(f"end-to-end {rows['engine']['views_per_s']:.0f} views/s (target >= {TARGET_GPU_VIEWS_PER_S}) {'ok' if ok else 'MISS'}")

    result = {
        "bench": "clip",
        "date": dt.date.today().isoformat(),
        "device": device_name,
        "info": engine.info(),
        "setup": {"panoramas": count, "views_per_panorama": len(engine.views), "batch_size": batch_size, "repeats": repeats},
        "rows": rows,
        "engine_fraction_of_model_only": fraction,
        "engine_speedup_over_naive": speedup,
        "versions": versions(("torch", "open_clip_torch", "numba", "triton", "py360convert")),
    }
    write_result("clip", device_name, result["date"], result, args.out)
    return result



if __name__ == "__main__":
    main()
