"""
Stable Diffusion: the tiny pipeline, the SD-1.5 UNet on the CPU, the SD-1.5 denoising loop on CUDA
=================================================================================================

What this measures, side by side in one run:

* tiny pipeline (``engine.models.tiny_sd``, loaded by ``Dreamer`` like real weights): img2img of
  64x64 views, ``--steps`` steps at strength 1, at batch 1 and at batch B. Images/s, and the gain from
  batching (B's images/s over batch 1's): the per-call overhead that batching across panoramas buys back.
* SD-1.5 UNet (diffusers ``UNet2DConditionModel`` with SD-1.5's config, random weights: the
  throughput is the architecture's) on the CPU: one denoising step with classifier-free guidance
  (the UNet on 2 x batch) at 256x256 (latents 32x32), fp32, at batch 1 and batch B. UNet steps/s,
  image-steps/s and the gain from batching.
* on CUDA: the SD-1.5 denoising loop at 512x512 (latents 64x64), fp16, channels_last, batch 1 with
  guidance (the UNet on 2), DDIM, ``--cuda-steps`` steps, timed with CUDA events after warm-up, for
  attention through PyTorch SDPA, through xformers (when installed), and SDPA with ``torch.compile``
  (CUDA graphs). it/s, the rate diffusers' progress bar shows, against the published anchor of
  stable-fast, about 105 it/s for SD 1.5 at 512x512, batch 1, on an H100 (its README; not re-measured
  here).

    python -m bench.diffusion [--quick] [--batch B] [--steps N] [--repeats R] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench._results import OUT_HELP, versions, write_result
from bench.reproject import cpu_model

BENCH_DIR = Path(__file__).resolve().parent
ANCHOR_IT_S = 105.0  # stable-fast, SD 1.5, 512x512, batch 1, H100 (published figure)
# diffusers' UNet2DConditionModel with SD-1.5's unet/config.json (the rest are the class defaults, which match).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                  "set_alpha_to_one": False, "steps_offset": 1}
GUIDANCE = 7.5


def median_seconds(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up; synchronised on CUDA."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples), samples


# -- the tiny pipeline -----------------------------------------------------------------------------


def bench_tiny(batch: int, steps: int, repeats: int) -> dict:
    from engine.models.diffusion import Dreamer
    from engine.models.tiny_sd import make_tiny_sd

    with tempfile.TemporaryDirectory() as folder:
        dreamer = Dreamer(make_tiny_sd(folder))
    views = torch.rand(batch, 3, dreamer.size, dreamer.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rows = {}
    for size in sorted({1, batch}):
        def run(size=size):
            return dreamer.img2img(views[:size], prompts=["a photograph of a street"] * size, strength=1.0, steps=steps,
                                   guidance=GUIDANCE, seeds=list(range(size)))

        seconds, samples = median_seconds(run, repeats, dreamer.device)
        rows[f"batch {size}"] = {"batch": size, "s": seconds, "samples_s": samples, "images_per_s": size / seconds}
    gain = rows[f"batch {batch}"]["images_per_s"] / rows["batch 1"]["images_per_s"]
    return {"size": dreamer.size, "steps": steps, "device": str(dreamer.device), "info": dreamer.info(),
            "rows": rows, "batching_gain": gain}


# -- the SD-1.5 UNet -------------------------------------------------------------------------------


def sd15_unet(device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
    # Cast only when needed: diffusers' ``to(dtype)`` logs a note on every call.
    unet = (unet.to(device=device, dtype=dtype) if dtype != torch.float32 else unet.to(device)).eval()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def bench_unet_cpu(batch: int, repeats: int) -> dict:
    """One guided denoising step of the SD-1.5 UNet at 256x256 (latents 32x32), fp32."""
    unet = sd15_unet(torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    timestep = torch.tensor(500)
    rows = {}
    for size in sorted({1, batch}):
        latents = torch.randn(2 * size, 4, 32, 32, generator=generator)
        context = torch.randn(2 * size, 77, 768, generator=generator)

        def step(latents=latents, context=context):
            with torch.inference_mode():
                return unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]

        seconds, samples = median_seconds(step, repeats, torch.device("cpu"))
        rows[f"batch {size}"] = {"batch": size, "unet_batch": 2 * size, "s": seconds, "samples_s": samples,
                                 "steps_per_s": 1 / seconds, "image_steps_per_s": size / seconds}
    gain = rows[f"batch {batch}"]["image_steps_per_s"] / rows["batch 1"]["image_steps_per_s"]
    parameters = sum(p.numel() for p in unet.parameters())
    return {"resolution": 256, "latents": 32, "dtype": "float32", "parameters": parameters, "rows": rows, "batching_gain": gain}


# -- CUDA: the SD-1.5 denoising loop ---------------------------------------------------------------


def denoise(unet, scheduler, latents: torch.Tensor, context: torch.Tensor, steps: int) -> torch.Tensor:
    """The loop diffusers' pipelines run, and that their it/s counts: guided UNet call plus scheduler step."""
    scheduler.set_timesteps(steps, device=latents.device)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        uncond, cond = noise.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents, return_dict=False)[0]
    return latents


def bench_cuda(steps: int, repeats: int) -> dict:
    from diffusers import DDIMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from engine.models.attention import xformers_available

    device = torch.device("cuda")
    unet = sd15_unet(device, torch.float16)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 4, 64, 64, device=device, dtype=torch.float16, generator=generator)
    context = torch.randn(2, 77, 768, device=device, dtype=torch.float16, generator=generator)

    def variant(model):
        def run():
            with torch.inference_mode():
                denoise(model, scheduler, latents, context, steps)
        return run

    rows, skipped = {}, {}
    unet.set_attn_processor(AttnProcessor2_0())
    plans = [("sdpa", lambda: unet)]
    ok, why = xformers_available()
    if ok:
        plans.append(("xformers", lambda: (unet.enable_xformers_memory_efficient_attention(), unet)[1]))
    else:
        skipped["xformers"] = why
    # CUDA graphs (reduce-overhead) remove the launch cost of ~700 kernels per step at batch 1.
    plans.append(("sdpa+compile", lambda: (unet.set_attn_processor(AttnProcessor2_0()), torch.compile(unet, mode="reduce-overhead"))[1]))
    for name, prepare in plans:
        model = prepare()
        start = time.perf_counter()
        variant(model)()  # warm-up; for compile, the compilation
        warm_s = time.perf_counter() - start
        seconds, samples = median_seconds(variant(model), repeats, device)
        rows[name] = {"s": seconds, "samples_s": samples, "it_per_s": steps / seconds, "warmup_s": warm_s,
                      "vs_stable_fast_anchor": steps / seconds / ANCHOR_IT_S}
    return {"resolution": 512, "latents": 64, "dtype": "float16", "batch": 1, "guidance": GUIDANCE, "steps": steps,
            "scheduler": "DDIMScheduler", "anchor": {"name": "stable-fast", "it_per_s": ANCHOR_IT_S, "device": "H100"},
            "rows": rows, "skipped": skipped}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.diffusion", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batch", type=int, default=None, help="batch compared with batch 1 (default 8; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of the tiny pipeline (default 20; quick 8)")
    parser.add_argument("--cuda-steps", type=int, default=50, help="denoising steps of the CUDA loop (default 50)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-unet", action="store_true", help="skip the SD-1.5 UNet on the CPU (it needs ~4 GB)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    args = parser.parse_args(argv)
    batch = args.batch or (4 if args.quick else 8)
    steps = args.steps or (8 if args.quick else 20)
    repeats = args.repeats or (2 if args.quick else 5)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else cpu_model()

    result = {"bench": "diffusion", "date": dt.date.today().isoformat(), "device": device_name,
              "host": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
              "setup": {"batch": batch, "steps": steps, "repeats": repeats, "guidance": GUIDANCE}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result["tiny"] = tiny = bench_tiny(batch, steps, repeats)
    print(f"\n{device_name}: tiny Stable Diffusion img2img, {tiny['size']}x{tiny['size']}, {steps} steps, {tiny['device']}")
    print(f"{'batch':<8}{'s/call':>9}{'images/s':>10}")
    for row in tiny["rows"].values():
        print(f"{row['batch']:<8}{row['s']:>9.3f}{row['images_per_s']:>10.2f}")
    print(f"batching gain (batch {batch} vs 1): {tiny['batching_gain']:.2f}x")

    if not args.no_unet:
        result["unet_cpu"] = unet = bench_unet_cpu(max(2, batch // 2), max(1, repeats // 2 + 1))
        print(f"\n{cpu_model()}: SD-1.5 UNet ({unet['parameters'] / 1e6:.0f}M parameters, random weights), one guided step, 256x256, fp32")
        print(f"{'batch':<8}{'unet batch':>11}{'s/step':>9}{'image-steps/s':>15}")
        for row in unet["rows"].values():
            print(f"{row['batch']:<8}{row['unet_batch']:>11}{row['s']:>9.3f}{row['image_steps_per_s']:>15.3f}")
        print(f"batching gain: {unet['batching_gain']:.2f}x; a 30-step dream at 256x256 takes "
              f"{30 / unet['rows']['batch 1']['image_steps_per_s']:.0f} s per image at batch 1 on this CPU")

    if cuda:
        result["cuda"] = gpu = bench_cuda(args.cuda_steps, max(repeats, 5))
        print(f"\n{device_name}: SD-1.5 denoising loop, 512x512, fp16, batch 1, guidance {GUIDANCE}, {args.cuda_steps} DDIM steps")
        print(f"{'attention':<16}{'it/s':>8}{'vs stable-fast 105 it/s (H100)':>32}")
        for name, row in gpu["rows"].items():
            print(f"{name:<16}{row['it_per_s']:>8.1f}{row['vs_stable_fast_anchor']:>31.2f}x")
        for name, why in gpu["skipped"].items():
            print(f"{name:<16}skipped: {why}")

    result["versions"] = versions(("torch", "diffusers", "transformers", "xformers"))
    write_result("diffusion", device_name, result["date"], result, args.out)
    return result



if __name__ == "__main__":
    main()
