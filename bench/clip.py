"""
CLIP engine: panoramas (JPEG bytes) -> views -> ViT-B-32 embeddings, at each precision
====================================================================================

What this measures, side by side in one run, on the same JPEG bytes (louvre.jpg re-encoded at
several yaws so no two inputs are identical), with the same weights at every precision:

* model-only: the image tower on pre-made normalised view tensors, the ceiling for any pipeline,
  at each precision (fp32 is the reference);
* engine: ``Engine.embed`` end to end from the JPEG bytes (decode with DCT scaling in a thread
  pool, one reprojection launch per group, the kernel writing the model's dtype, one model call
  per batch), at each precision;
* naive: what a clip-retrieval-style script does: PIL decode, py360convert ``e2p`` per view,
  open_clip's preprocess on each view, the model (fp32 on the CPU) in batches of 32.

The precisions are fp32 and what ``--precision auto`` picks here (fp16 on CUDA; bf16 on a CPU with
native bf16, AMX or AVX512-BF16, detected at run time), or ``--precisions``. Where the CPU has no
native bf16, auto stays fp32 and the bench says why. Repeats are interleaved (every pipeline once,
then again), so a neighbour's load on a shared machine falls on all of them alike; medians.

Reported: views/s of each; the engine at auto against the engine at fp32 (target >= 2x on a CPU with
AMX) and against model-only at its own precision (target >= 0.9); agreement of each precision with
fp32 on the same views: the minimum cosine between embeddings, and top-1 label agreement over the
vocabularies (with random weights the labels mean nothing, but a flip is still a numerical one).
JSON goes to ``bench/runs/`` (or ``--out``).

    python -m bench.clip [--quick] [--panoramas N] [--batch-size B] [--precisions fp32,bf16] [--out DIR]
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

from bench._results import OUT_HELP, PANORAMAS, versions, write_result
from bench.reproject import cpu_model
from engine import Engine, EngineConfig, Panorama
from kernels.geometry import py360convert_fov

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PANO = PANORAMAS / "louvre.jpg"
TARGET_FRACTION_OF_MODEL = 0.9
TARGET_GPU_VIEWS_PER_S = 15_000  # ViT-B/32, fp16, end to end from JPEG bytes, on an H100 or H200
TARGET_AUTO_OVER_FP32 = 2.0  # the CPU engine at bf16 over itself at fp32, where bf16 is native (AMX)


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


def interleaved_medians(fns: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, list[float]]]:
    """Each fn once to warm up (JIT compilation, allocator, autotuning), then ``repeats`` rounds of every
    fn in turn: (median seconds, samples) per name."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times), times) for name, times in samples.items()}


def agreement(reference: list, other: list) -> dict:
    """Minimum cosine between the two runs' view embeddings, and the fraction of (view, vocabulary) top-1
    labels they share, over the same panoramas."""
    cosines, same, total = [], 0, 0
    for a, b in zip(reference, other, strict=True):
        cosines.append(torch.nn.functional.cosine_similarity(a.embeddings.float(), b.embeddings.float(), dim=1))
        for name, reading in a.readings.items():
            for view_a, view_b in zip(reading["views"], b.readings[name]["views"], strict=True):
                same += view_a[0][0] == view_b[0][0]
                total += 1
    return {"min_cosine": float(torch.cat(cosines).min()), "top1_agreement": same / total if total else None, "labels_compared": total}


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
    from engine.models.device import resolve_device, resolve_precision

    parser = argparse.ArgumentParser(prog="python -m bench.clip", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer panoramas and repeats")
    parser.add_argument("--panoramas", type=int, default=None, help="panoramas per pass (default 8 on CPU, 256 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="views per model call (default 64 on CPU, 1024 on CUDA)")
    parser.add_argument("--precisions", default=None, help="comma-separated, besides fp32 (default: what auto picks here)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    parser.add_argument("--pano", type=Path, default=DEFAULT_PANO)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    count = args.panoramas or (256 if cuda else (4 if args.quick else 8))
    batch_size = args.batch_size or (1024 if cuda else 64)
    repeats = args.repeats or (2 if args.quick else 3)
    device = resolve_device("auto")
    auto, auto_reason = resolve_precision("auto", device)
    wanted = args.precisions.split(",") if args.precisions else [auto]
    precisions = ["fp32"] + [p.strip() for p in wanted if p.strip() and p.strip() != "fp32"]
    print(f"--precision auto here: {auto} ({auto_reason})")
    if auto == "fp32" and not args.precisions:
        print("so only fp32 runs: bf16 would be emulated on this CPU, slower than fp32 (--precisions bf16 runs it anyway)")

    engines = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights: expected here, said above
        for precision in precisions:  # the same seed: the same weights at every precision
            engines[precision] = Engine(EngineConfig(clip_model="ViT-B-32", random_weights=True, batch_size=batch_size, precision=precision))
    reference = engines["fp32"]
    blobs = jpeg_panoramas(args.pano, count)
    panoramas = [Panorama(id=f"pano-{k}", data=blob) for k, blob in enumerate(blobs)]
    views = count * len(reference.views)
    h, w = reference.clip.image_size
    ready = torch.randn(views, 3, h, w, device=device)

    def model_only(engine):
        inputs = ready.to(engine.clip.dtype)  # already normalised, in the model's dtype, on its device
        return lambda: [engine.clip.encode_images(chunk) for chunk in inputs.split(batch_size)]

    def end_to_end(engine):
        def run():
            results = engine.embed(panoramas)
            assert all(r.error is None for r in results), [r.error for r in results if r.error]
            return results
        return run

    fns = {}
    for precision, engine in engines.items():
        fns[f"model_only_{precision}"] = model_only(engine)
        fns[f"engine_{precision}"] = end_to_end(engine)
    if not cuda or not args.quick:
        fns["naive_fp32"] = naive_pipeline(reference, blobs)
    timings = interleaved_medians(fns, repeats, device)
    rows = {name: {"s": s, "samples_s": samples, "views_per_s": views / s} for name, (s, samples) in timings.items()}

    outputs = {precision: end_to_end(engine)() for precision, engine in engines.items()}
    agreements = {p: agreement(outputs["fp32"], outputs[p]) for p in precisions if p != "fp32"}
    fractions = {p: rows[f"engine_{p}"]["views_per_s"] / rows[f"model_only_{p}"]["views_per_s"] for p in precisions}
    over_fp32 = {p: rows[f"engine_{p}"]["views_per_s"] / rows["engine_fp32"]["views_per_s"] for p in precisions if p != "fp32"}

    device_name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    print(f"\n{device_name}: ViT-B-32 (random weights), {count} panoramas x {len(reference.views)} views, batch {batch_size}, "
          f"median of {repeats} interleaved repeats")
    print(f"{'pipeline':<18}{'s/pass':>9}{'views/s':>10}{'x engine fp32':>15}")
    for name, row in rows.items():
        print(f"{name:<18}{row['s']:>9.2f}{row['views_per_s']:>10.1f}{row['views_per_s'] / rows['engine_fp32']['views_per_s']:>15.2f}")
    for p in precisions:
        ok = "ok" if fractions[p] >= TARGET_FRACTION_OF_MODEL else "MISS"
        print(f"engine {p} keeps {fractions[p]:.2f} of model-only {p} (target >= {TARGET_FRACTION_OF_MODEL}) {ok}")
    for p, a in agreements.items():
        print(f"{p} vs fp32 on the same views: min cosine {a['min_cosine']:.5f}, top-1 labels agree {a['top1_agreement']:.3f} "
              f"({a['labels_compared']} view-vocabulary pairs)")
    if auto != "fp32" and auto in over_fp32:
        target = f" (target >= {TARGET_AUTO_OVER_FP32}x on a CPU with AMX)" if not cuda else ""
        ok = "" if cuda else (" ok" if over_fp32[auto] >= TARGET_AUTO_OVER_FP32 else " MISS")
        print(f"engine at auto ({auto}) is {over_fp32[auto]:.2f}x the engine at fp32{target}{ok}")
    elif auto == "fp32":
        print(f"auto stays fp32 here: {auto_reason}")
    speedup = rows[f"engine_{auto}"]["views_per_s"] / rows["naive_fp32"]["views_per_s"] if "naive_fp32" in rows and auto in precisions else None
    if speedup is not None:
        print(f"engine at auto vs naive (PIL + py360convert + open_clip preprocess, fp32): {speedup:.2f}x {'ok' if speedup > 1 else 'MISS'}")
    if cuda and auto in precisions:
        got = rows[f"engine_{auto}"]["views_per_s"]
        print(f"end-to-end {got:.0f} views/s at {auto} (target >= {TARGET_GPU_VIEWS_PER_S}) {'ok' if got >= TARGET_GPU_VIEWS_PER_S else 'MISS'}")

    result = {
        "bench": "clip",
        "date": dt.date.today().isoformat(),
        "device": device_name,
        "auto": {"precision": auto, "reason": auto_reason},
        "info": {p: engine.info() for p, engine in engines.items()},
        "setup": {"panoramas": count, "views_per_panorama": len(reference.views), "batch_size": batch_size, "repeats": repeats,
                  "precisions": precisions, "interleaved": True},
        "rows": rows,
        "engine_fraction_of_model_only": fractions,
        "engine_over_engine_fp32": over_fp32,
        "agreement_with_fp32": agreements,
        "engine_speedup_over_naive": speedup,
        "versions": versions(("torch", "open_clip_torch", "numba", "triton", "py360convert")),
    }
    write_result("clip", device_name, result["date"], result, args.out)
    return result


if __name__ == "__main__":
    main()
