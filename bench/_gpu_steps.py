"""The steps of ``python -m bench.gpu``, one function each, run in a child process of their own.

Each step gets a ``Step`` record: ``left()`` says how many seconds of its budget remain, and
``put(key, value)`` stores a figure and writes the step's JSON at once, so a step stopped at its budget
still hands back everything it measured. Inside a step every case is tried on its own (``case``): a
failure is recorded with its error and the next case runs. Figures are medians of CUDA-event timings
after warm-up (``cuda_seconds``); host-side pipelines (the engine, the decode pool) are timed with
``perf_counter`` around a synchronised run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench._results import PANORAMAS

REPO = Path(__file__).resolve().parents[1]
PANO = PANORAMAS / "louvre.jpg"


class Step:
    """What a step function sees: its budget and the place its figures go."""

    def __init__(self, name: str, budget_s: float, out: Path):
        self.name, self.budget_s, self.out = name, budget_s, out
        self.start = time.monotonic()
        self.figures: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def put(self, key: str, value) -> None:
        self.figures[key] = value
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.figures, indent=1, default=str))
        os.replace(tmp, self.out)  # the parent reads a whole file even if this process is killed now

    def fits(self, key: str, needs_s: float) -> bool:
        """Whether about ``needs_s`` seconds are left for case ``key``; if not, it is recorded as skipped."""
        if self.left() >= needs_s:
            return True
        self.put(key, {"skipped": f"budget: {self.left():.0f} s left, this case needs about {needs_s:.0f} s"})
        return False

    @contextlib.contextmanager
    def case(self, key: str):
        """Run one case: its figure is what the block ``put``s under ``key``; an exception is recorded
        as ``{"error": ...}`` and the step goes on (``fits`` first, for a case that takes a while)."""
        try:
            yield key
        except Exception as exc:  # every failure is a finding to report, not a crash
            self.put(key, {"error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-2000:]})


def cuda_seconds(fn, *, repeats: int = 10, warmup: int = 3) -> dict:
    """Median seconds of ``fn`` from CUDA events, after ``warmup`` calls (compilation, autotuning, caches)."""
    from bench._results import cuda_median

    median, samples = cuda_median(fn, repeats=repeats, warmup=warmup)
    return {"s": median, "samples_s": samples}


def wall_seconds(fn, *, repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall seconds of a host-driven pipeline, the GPU synchronised before and after each run."""
    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return {"s": statistics.median(samples), "samples_s": samples}


def louvre() -> np.ndarray:
    from PIL import Image

    with Image.open(PANO) as image:
        return np.asarray(image.convert("RGB"))


def jpegs(count: int, width: int = 4096) -> list[bytes]:
    """``count`` distinct JPEGs of louvre.jpg (turned by a column roll each), quality 90, ``width`` wide."""
    from PIL import Image

    pixels = louvre()
    if pixels.shape[1] != width:
        pixels = np.asarray(Image.fromarray(pixels).resize((width, width // 2), Image.Resampling.BICUBIC))
    blobs = []
    for k in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(pixels, k * pixels.shape[1] // max(count, 1), axis=1)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def hbm_peak() -> tuple[float | None, str]:
    """The device's DRAM bandwidth in bytes/s: from its memory clock and bus width where torch exposes them
    (double data rate), else from bench.reproject's table of published figures."""
    import torch

    from bench.reproject import peak_bandwidth

    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, f"device properties: {clock_khz / 1e3:.0f} MHz x {bus_bits} bits x 2"
    table = peak_bandwidth(torch.cuda.get_device_name(0))
    return table, "bench.reproject.PEAK_BANDWIDTH (published)" if table else "unknown"


# -- 1. environment ----------------------------------------------------------------------------------


def environment(step: Step) -> None:
    import torch

    from bench._results import versions

    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    peak, source = hbm_peak()
    step.put("device", {
        "name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "multiprocessors": props.multi_processor_count, "memory_gib": total / 2**30, "free_gib": free / 2**30,
        "hbm_bytes_per_s": peak, "hbm_source": source, "count": torch.cuda.device_count(),
    })
    step.put("cuda", {"torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                      "bf16": torch.cuda.is_bf16_supported(),
                      "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(), "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}})
    with step.case("driver"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
        step.put("driver", done.stdout.strip() or done.stderr.strip())
    step.put("versions", versions(("torch", "triton", "xformers", "torchvision", "diffusers", "transformers", "open_clip_torch", "numba", "numpy")))
    from engine.models.attention import xformers_available

    step.put("xformers", dict(zip(("available", "why_not"), xformers_available(), strict=True)))


# -- 2. tests ----------------------------------------------------------------------------------------


# The tests that take a CUDA path: those marked cuda, and the Triton ones, which run on the GPU where there is
# one (tests/conftest.py's TRITON_DEVICE). Only their files are collected: collecting the whole suite would
# import what the GPU machine may lack (grpc's health service, Ray, py360convert) and fail before a test ran.
# tests/test_bench_gpu.py checks that this selects every test marked cuda.
GPU_TEST_FILES = ("tests/test_backends.py", "tests/test_huge_angles.py", "tests/test_antialias.py", "tests/test_seam_and_poles.py",
                  "tests/test_clip_model.py", "tests/test_decode.py", "tests/test_dream.py", "tests/test_precision.py")
GPU_TESTS = "triton or cuda or nvjpeg or xformers"


def tests(step: Step) -> None:
    """The tests of every CUDA path (``GPU_TESTS``), then the Triton kernel against the float64 reference on the GPU."""
    with step.case("pytest_cuda"):
        budget = max(10.0, step.left() * 0.5)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *GPU_TEST_FILES, "-k", GPU_TESTS]
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=budget)
            tail, rc = (done.stdout + done.stderr)[-3000:], done.returncode
        except subprocess.TimeoutExpired as exc:
            tail, rc = f"timed out after {budget:.0f} s\n" + ((exc.stdout or b"")[-3000:].decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout or "")[-3000:]), None
        summary = [line for line in tail.splitlines() if " passed" in line or " failed" in line or " error" in line]
        step.put("pytest_cuda", {"returncode": rc, "ok": rc == 0, "summary": summary[-1] if summary else None, "tail": tail})
    reference_cases(step)


def reference_cases(step: Step) -> None:
    """Triton on CUDA against the float64 reference: panoramas 512 to 4096 wide, rolls, pitches up to
    and over the poles, yaws on the seam, antialias on and off. Small views: the reference is slow."""
    import torch

    from kernels import ViewSpec, reproject
    from kernels.reference import reproject_reference

    image = louvre()
    views = [
        ViewSpec(yaw=180.0, pitch=0.0, roll=0.0, fov=90.0, width=20, height=16),  # the seam in the middle
        ViewSpec(yaw=-179.5, pitch=30.0, roll=30.0, fov=60.0, width=20, height=16),
        ViewSpec(yaw=45.0, pitch=90.0, roll=0.0, fov=100.0, width=20, height=16),  # the north pole
        ViewSpec(yaw=10.0, pitch=-90.0, roll=-120.0, fov=90.0, width=20, height=16),  # the south pole, rolled
        ViewSpec(yaw=300.0, pitch=89.0, roll=75.0, fov=120.0, width=20, height=16),  # over the pole
    ]
    worst = 0.0
    for width in (512, 2048, 4096):
        step_rows = max(1, image.shape[1] // width)
        pano = np.ascontiguousarray(image[::step_rows, ::step_rows][: width // 2, :width])
        for antialias in (True, False):
            key = f"reference_{width}_{'aa' if antialias else 'bilinear'}"
            if step.fits(key, 5):
                with step.case(key):
                    got = reproject([torch.from_numpy(pano).cuda()], views, antialias=antialias, backend="triton")[0].cpu().double()
                    want = torch.from_numpy(reproject_reference(pano, views, antialias=antialias) / 255)
                    error = float((got - want).abs().max())
                    worst = max(worst, error)
                    step.put(key, {"max_abs_error": error, "ok": error <= 1e-3, "tolerance": 1e-3})  # tests/test_backends.py's
    step.put("reference_worst", {"max_abs_error": worst, "ok": worst <= 1e-3})
    with step.case("triton_vs_numba_4096_ring8"):
        from bench.reproject import VIEWS

        cpu = torch.from_numpy(image)
        for antialias in (True, False):
            a = reproject([cpu], VIEWS, antialias=antialias, backend="numba")
            b = reproject([cpu.cuda()], VIEWS, antialias=antialias, backend="triton").cpu()
            step.put(f"triton_vs_numba_4096_ring8_{'aa' if antialias else 'bilinear'}", {"max_abs_diff": float((a - b).abs().max())})


# -- 3. kernel bandwidth -----------------------------------------------------------------------------


def kernel(step: Step) -> None:
    """Achieved GB/s of the Triton kernel against the bytes it must move, for 8 x 224^2 views (ring8),
    panoramas 1024 and 4096 wide, M = 1 to 256 per launch, fp16 CLIP-normalised output."""
    import torch
    from PIL import Image

    from bench.reproject import VIEWS, pano_bytes_under_views
    from kernels import reproject

    peak, source = hbm_peak()
    step.put("peak", {"bytes_per_s": peak, "source": source})
    image = louvre()
    for width in (1024, 4096):
        pixels = image if width == image.shape[1] else np.asarray(Image.fromarray(image).resize((width, width // 2), Image.Resampling.BICUBIC))
        one = torch.from_numpy(np.ascontiguousarray(pixels)).cuda()
        for m in (1, 4, 16, 64, 256):
            panos = one[None].repeat(m, 1, 1, 1)  # distinct copies: nothing is served twice from L2 across panoramas
            for antialias in (True, False):
                key = f"w{width}_m{m}_{'aa' if antialias else 'bilinear'}"
                if step.fits(key, 3):
                    with step.case(key):
                        def run(panos=panos, antialias=antialias):
                            return reproject(panos, VIEWS, out_dtype=torch.float16, normalize="clip", antialias=antialias)

                        timing = cuda_seconds(run, repeats=10)
                        out_bytes = m * len(VIEWS) * 3 * 224 * 224 * 2
                        # What no kernel can avoid: the panorama rows under the views, read once; each output written once.
                        moved = m * pano_bytes_under_views(*pixels.shape[:2]) + out_bytes
                        rate = moved / timing["s"]
                        step.put(key, {"width": width, "panoramas": m, "antialias": antialias, **timing, "bytes": moved,
                                       "GB_per_s": rate / 1e9, "fraction_of_peak": rate / peak if peak else None,
                                       "views_per_s": m * len(VIEWS) / timing["s"]})
            del panos
        torch.cuda.empty_cache()


# -- 4. decode ---------------------------------------------------------------------------------------


def decode(step: Step) -> None:
    """4K panoramas/s: nvJPEG batches (full resolution) against the CPU pool (libjpeg with DCT scaling
    to what ring8 at 224 px needs), each alone, then both at once. The engine needs about 2,000/s to
    feed 16,000 views/s."""
    import threading

    import torch

    from bench.reproject import VIEWS
    from engine.decode import decode_image, decode_jpeg_batch_cuda, required_width

    blobs = jpegs(64)
    min_width = required_width(VIEWS)
    workers = os.cpu_count() or 4
    step.put("setup", {"jpegs": len(blobs), "mean_bytes": sum(map(len, blobs)) / len(blobs), "cpu_workers": workers,
                       "cpu_min_width": min_width, "needed_per_s": 2000})

    def gpu_pass():
        out = decode_jpeg_batch_cuda(blobs, device="cuda")
        assert all(isinstance(t, torch.Tensor) for t in out), [t for t in out if not isinstance(t, torch.Tensor)][:1]
        return out

    pool = ThreadPoolExecutor(workers)

    def cpu_pass():
        list(pool.map(lambda blob: decode_image(blob, min_width=min_width), blobs))

    if step.fits("nvjpeg", 5):
        with step.case("nvjpeg"):
            timing = wall_seconds(gpu_pass, repeats=5)
            step.put("nvjpeg", {**timing, "panoramas_per_s": len(blobs) / timing["s"]})
    if step.fits("cpu_pool", 5):
        with step.case("cpu_pool"):
            timing = wall_seconds(cpu_pass, repeats=3)
            step.put("cpu_pool", {**timing, "panoramas_per_s": len(blobs) / timing["s"]})
    if step.fits("both", 8):
        with step.case("both"):
            stop, counts = threading.Event(), {"cpu": 0}

            def cpu_loop():
                while not stop.is_set():
                    cpu_pass()
                    counts["cpu"] += len(blobs)

            thread = threading.Thread(target=cpu_loop)
            start = time.perf_counter()
            thread.start()
            gpu = 0
            while time.perf_counter() - start < 5.0:
                gpu_pass()
                gpu += len(blobs)
            torch.cuda.synchronize()
            stop.set()
            thread.join()
            seconds = time.perf_counter() - start
            step.put("both", {"s": seconds, "nvjpeg_per_s": gpu / seconds, "cpu_per_s": counts["cpu"] / seconds,
                              "total_per_s": (gpu + counts["cpu"]) / seconds})
    pool.shutdown()


# -- 5. CLIP -----------------------------------------------------------------------------------------


def clip(step: Step) -> None:
    """ViT-B-32 and ViT-L-14, random weights, fp16: model-only and the engine from 4K JPEGs, views/s,
    SDPA and xformers, batch 256 and 1024, then torch.compile. Cases run in order of importance."""
    import copy
    import dataclasses
    import warnings

    import torch

    from engine import Engine, EngineConfig, Panorama
    from engine.models.attention import configure_attention, restore_attention, xformers_available

    blobs = jpegs(32)
    xformers_ok, why = xformers_available()
    if not xformers_ok:
        step.put("xformers", {"skipped": why})
    loaded = {}
    for model_name in ("ViT-B-32", "ViT-L-14"):
        if step.fits(f"{model_name}_load", 20):
            with step.case(f"{model_name}_load"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    engine = Engine(EngineConfig(clip_model=model_name, random_weights=True, batch_size=1024, precision="fp16", attention="sdpa"))
                step.put(f"{model_name}_load", {"info": {k: engine.info()[k] for k in ("dtype", "precision", "attention", "reprojection")}})
        if "info" not in step.figures.get(f"{model_name}_load", {}):  # skipped or failed: nothing to measure
            continue
        h, w = engine.clip.image_size
        for attention in ("sdpa", "xformers") if xformers_ok else ("sdpa",):
            with step.case(f"{model_name}_{attention}_switch"):
                restore_attention(engine.clip.model)
                configure_attention(engine.clip.model, attention)
            for batch in (1024, 256):
                ready = torch.randn(batch, 3, h, w, device="cuda", dtype=torch.float16)
                key = f"{model_name}_{attention}_b{batch}"
                if step.fits(f"{key}_model_only", 8):
                    with step.case(f"{key}_model_only"):
                        timing = cuda_seconds(lambda ready=ready, engine=engine: engine.clip.encode_images(ready), repeats=10)
                        step.put(f"{key}_model_only", {**timing, "views_per_s": batch / timing["s"]})
                if step.fits(f"{key}_engine", 15):
                    with step.case(f"{key}_engine"):
                        variant = copy.copy(engine)
                        variant.config = dataclasses.replace(engine.config, batch_size=batch)
                        count = 2 * batch // len(engine.views)  # two full model batches per pass
                        panoramas = [Panorama(id=f"p{k}", data=blobs[k % len(blobs)]) for k in range(count)]

                        def run(variant=variant, panoramas=panoramas):
                            results = variant.embed(panoramas)
                            assert all(r.error is None for r in results), next(r.error for r in results if r.error)

                        timing = wall_seconds(run, repeats=3)
                        step.put(f"{key}_engine", {**timing, "views_per_s": count * len(engine.views) / timing["s"], "panoramas": count})
                del ready
        if step.fits(f"{model_name}_xformers_agrees_with_sdpa", 5):
            with step.case(f"{model_name}_xformers_agrees_with_sdpa"):
                if xformers_ok:
                    views = torch.randn(64, 3, h, w, device="cuda", dtype=torch.float16)
                    configure_attention(engine.clip.model, "sdpa")
                    a = engine.clip.encode_images(views).float()
                    configure_attention(engine.clip.model, "xformers")
                    b = engine.clip.encode_images(views).float()
                    step.put(f"{model_name}_xformers_agrees_with_sdpa", {"min_cosine": float(torch.nn.functional.cosine_similarity(a, b).min())})
        loaded[model_name] = engine
    # torch.compile last: its first call compiles (tens of seconds per shape).
    for model_name, engine in loaded.items():
        configure_attention(engine.clip.model, "sdpa")
        h, w = engine.clip.image_size
        compiled = torch.compile(engine.clip.model.visual)
        for batch in (1024, 256):
            key = f"{model_name}_sdpa_compile_b{batch}_model_only"
            if step.fits(key, 45):
                with step.case(key):
                    ready = torch.randn(batch, 3, h, w, device="cuda", dtype=torch.float16)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        compiled(ready)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - start

                    def run(ready=ready, compiled=compiled):
                        with torch.inference_mode():
                            return compiled(ready)

                    timing = cuda_seconds(run, repeats=10)
                    step.put(key, {**timing, "views_per_s": batch / timing["s"], "compile_s": compile_s})
        if step.fits(f"{model_name}_sdpa_compile_b1024_engine", 30):
            with step.case(f"{model_name}_sdpa_compile_b1024_engine"):
                variant = copy.copy(engine)
                variant.clip = dataclasses.replace(engine.clip, _encode_image=compiled, compiled=True)
                count = 2 * 1024 // len(engine.views)
                panoramas = [Panorama(id=f"p{k}", data=blobs[k % len(blobs)]) for k in range(count)]

                def run(variant=variant, panoramas=panoramas):
                    variant.embed(panoramas)

                timing = wall_seconds(run, repeats=3)
                step.put(f"{model_name}_sdpa_compile_b1024_engine", {**timing, "views_per_s": count * len(engine.views) / timing["s"]})


# -- 6. diffusion ------------------------------------------------------------------------------------


def diffusion(step: Step) -> None:
    """The Dreamer on CUDA (tiny SD, fp16, channels_last, its attention), then the SD-1.5 UNet (random
    weights) in the guided denoising loop at 512^2 (latents 64^2), fp16: SDPA, xformers, compiled; it/s at
    batch 1 and 8."""
    import tempfile

    import torch
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from bench.diffusion import SD15_SCHEDULER, SD15_UNET, denoise
    from engine.models.attention import xformers_available

    if step.fits("dreamer_tiny", 10):
        with step.case("dreamer_tiny"):
            from engine.models.diffusion import Dreamer
            from engine.models.tiny_sd import make_tiny_sd

            with tempfile.TemporaryDirectory() as folder:
                dreamer = Dreamer(make_tiny_sd(folder), device="cuda")
                views = torch.rand(2, 3, dreamer.size, dreamer.size) * 2 - 1
                out = dreamer.img2img(views, prompts=["a street"] * 2, strength=0.6, steps=4, guidance=7.5, seeds=[0, 1])
            step.put("dreamer_tiny", {"info": {k: dreamer.info()[k] for k in ("dtype", "precision", "attention")},
                                      "finite": bool(torch.isfinite(out.images).all())})
    steps = 20
    if step.fits("unet_load", 15):
        with step.case("unet_load"):
            from diffusers import UNet2DConditionModel

            torch.manual_seed(0)
            with torch.device("cuda"):  # initialised on the GPU: seconds, where 860M parameters on the CPU take a minute
                unet = UNet2DConditionModel(**SD15_UNET).to(torch.float16).eval()
            unet.to(memory_format=torch.channels_last)
            step.put("unet_load", {"parameters": sum(p.numel() for p in unet.parameters())})
    if "parameters" not in step.figures.get("unet_load", {}):
        return
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    xformers_ok, why = xformers_available()
    plans = [("sdpa", lambda: (unet.set_attn_processor(AttnProcessor2_0()), unet)[1], 8)]
    if xformers_ok:
        plans.append(("xformers", lambda: (unet.enable_xformers_memory_efficient_attention(), unet)[1], 8))
    else:
        step.put("xformers", {"skipped": why})
    plans.append(("sdpa_compile", lambda: (unet.set_attn_processor(AttnProcessor2_0()), torch.compile(unet, mode="reduce-overhead"))[1], 60))
    for name, prepare, needs in plans:
        if step.fits(f"{name}_prepare", needs):
            with step.case(f"{name}_prepare"):
                model = prepare()
                step.put(f"{name}_prepare", {"ok": True})
        if not step.figures.get(f"{name}_prepare", {}).get("ok"):
            continue
        for batch in (1, 8):
            key = f"{name}_b{batch}"
            if step.fits(key, needs):
                with step.case(key):
                    generator = torch.Generator("cuda").manual_seed(0)
                    latents = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.float16, generator=generator)
                    context = torch.randn(2 * batch, 77, 768, device="cuda", dtype=torch.float16, generator=generator)

                    def run(model=model, latents=latents, context=context):
                        with torch.inference_mode():
                            return denoise(model, scheduler, latents, context, steps)

                    start = time.perf_counter()
                    run()  # the first call: for compile, the compilation
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - start
                    timing = cuda_seconds(run, repeats=3, warmup=1)
                    step.put(key, {**timing, "batch": batch, "steps": steps, "it_per_s": steps / timing["s"],
                                   "image_it_per_s": batch * steps / timing["s"], "first_call_s": first_s})
