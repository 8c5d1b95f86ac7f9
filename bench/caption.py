"""
Captions: the tiny BLIP and the BLIP-base architecture, batched against one at a time; translate rounds/s
==========================================================================================================

What this measures, side by side in one run:

* tiny BLIP (``engine.models.tiny_caption``, loaded by ``Captioner`` like real weights): captions of
  the louvre panorama's ring8 views cut by the kernel at its size, all views in one ``generate`` call
  against one call per view. Captions/s, and the gain from batching (the peer, CLIP Interrogator,
  captions one image at a time).
* BLIP-base (transformers' ``BlipForConditionalGeneration`` with blip-image-captioning-base's
  configuration, random weights: the throughput is the architecture's) at 384x384, beam search of 3:
  captions/s batched against one at a time.
* translate: rounds/s of ``engine.dream.translate`` with the tiny CLIP, SD and BLIP (txt2img).

    python -m bench.caption [--quick] [--batch B] [--tokens N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._results import OUT_HELP, PANORAMAS, versions, write_result

PANORAMA = PANORAMAS / "louvre.jpg"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def batched_vs_single(caption_batch, pixels: torch.Tensor, repeats: int) -> dict:
    """Captions/s for all of ``pixels`` in one call and for one call per image, and the ratio."""
    count = len(pixels)
    batched = median_seconds(lambda: caption_batch(pixels), repeats)
    single = median_seconds(lambda: [caption_batch(pixels[i : i + 1]) for i in range(count)], repeats)
    return {"images": count, "batched_per_s": count / batched, "single_per_s": count / single, "batching_gain": single / batched}


def bench_tiny(folder: Path, pano: np.ndarray, repeats: int) -> dict:
    from engine.models.caption import Captioner
    from engine.views import ring8

    captioner = Captioner(folder / "caption")
    pixels = captioner.render([pano], ring8())[0]
    return {"model": "tiny BLIP", "size": list(captioner.image_size), "beams": captioner.beams,
            **batched_vs_single(captioner.caption, pixels, repeats)}


def bench_blip_base(batch: int, tokens: int, repeats: int) -> dict:
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig()).eval()  # the defaults are blip-image-captioning-base's widths
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))

    def run(x):
        with torch.inference_mode():
            # min_new_tokens: an untrained model may stop at once; every caption runs the full length
            return model.generate(pixel_values=x, num_beams=3, max_new_tokens=tokens, min_new_tokens=tokens)

    parameters = sum(p.numel() for p in model.parameters())
    return {"model": "BLIP-base architecture (random weights)", "parameters": parameters, "size": [size, size], "beams": 3,
            "tokens": tokens, **batched_vs_single(run, pixels, repeats)}


def bench_translate(folder: Path, rounds: int, repeats: int) -> dict:
    from engine import Engine, EngineConfig
    from engine.dream.translate import TranslateParams, translate
    from engine.models.caption import Captioner
    from engine.models.diffusion import Dreamer

    engine = Engine(EngineConfig(clip_model=f"local-dir:{folder / 'clip'}", vocabularies=()))
    dreamer, captioner = Dreamer(folder / "sd"), Captioner(folder / "caption")
    with Image.open(PANORAMA) as im:
        photo = np.asarray(im.convert("RGB").crop((1500, 700, 2100, 1300)))
    params = TranslateParams(rounds=rounds, steps=10)
    seconds = median_seconds(lambda: translate(engine, dreamer, captioner, [("a", photo)], params), repeats)
    return {"rounds": rounds, "steps": params.steps, "mode": params.mode, "rounds_per_s": rounds / seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.caption", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="smaller batch, shorter captions, fewer repeats")
    parser.add_argument("--batch", type=int, default=None, help="BLIP-base batch (default 8; quick 4)")
    parser.add_argument("--tokens", type=int, default=None, help="BLIP-base caption length in tokens (default 20; quick 8)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=OUT_HELP)
    args = parser.parse_args(argv)
    batch = args.batch or (4 if args.quick else 8)
    tokens = args.tokens or (8 if args.quick else 20)
    repeats = 1 if args.quick else 3
    from engine.decode import decode_image
    from engine.models.tiny import make_tiny_clip
    from engine.models.tiny_caption import make_tiny_caption
    from engine.models.tiny_sd import make_tiny_sd

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()
    result = {"bench": "caption", "date": dt.date.today().isoformat(), "device": device,
              "host": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
              "versions": versions(["torch", "transformers", "diffusers"])}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_tiny_clip(folder), make_tiny_sd(folder), make_tiny_caption(folder)
        pano = decode_image(PANORAMA, min_width=1024)
        result["tiny"] = tiny = bench_tiny(folder, pano, repeats + 2)
        result["translate"] = tr = bench_translate(folder, 3 if args.quick else 5, repeats)
    result["blip_base"] = base = bench_blip_base(batch, tokens, repeats)
    print(f"\n{device}: captions/s, one generate call for the whole batch vs one call per image")
    print(f"{'model':<44}{'images':>7}{'batched/s':>11}{'single/s':>10}{'gain':>7}")
    for row in (tiny, base):
        print(f"{row['model']:<44}{row['images']:>7}{row['batched_per_s']:>11.2f}{row['single_per_s']:>10.2f}{row['batching_gain']:>6.2f}x")
    print(f"translate (tiny CLIP, SD, BLIP; txt2img, {tr['steps']} steps): {tr['rounds_per_s']:.2f} rounds/s")
    write_result("caption", device, result["date"], result, args.out)
    return result


if __name__ == "__main__":
    main()
