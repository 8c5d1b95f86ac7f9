"""The ``mimetic caption`` command: a thin shell over ``engine.dream.interrogate``.

    mimetic caption PANO [PANO ...] --out captions.csv [--caption-model DIR] [--flavours mediums,movements,styles] [--plain]
    mimetic translate IMAGE [IMAGE ...] --rounds N --out DIR --sd-model DIR --caption-model DIR [--mode txt2img|img2img]

A folder of images to a captions CSV is one command: ``mimetic caption photos/*.jpg --plain --out captions.csv``.
Parameters are checked before any model loads; a bad one is one line and exit status 2. An input that
fails gets its row with ``error`` and the others go on (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("caption", "translate")
DEFAULT_FLAVOURS = ("mediums", "movements", "styles")


def add_captioner_arguments(parser, *, flavours: bool = True) -> None:
    """--caption-model, --caption-beams, --caption-max-tokens and (``flavours``) --flavours: the captioner's
    flags wherever one runs (caption, translate, dream --prompt-from caption)."""
    from engine.cli import positive_int
    from engine.config import DEFAULT_CAPTION_BEAMS, DEFAULT_CAPTION_MAX_TOKENS  # not models.caption: torch

    group = parser.add_argument_group("captioner")
    group.add_argument("--caption-model", default=None, metavar="DIR", help="a local transformers captioner folder (BLIP, or any AutoModelForImageTextToText)")
    if flavours:
        group.add_argument("--flavours", default=",".join(DEFAULT_FLAVOURS), metavar="VOCABS",
                           help=f"comma-separated vocabularies whose top labels follow the caption (default {','.join(DEFAULT_FLAVOURS)})")
    group.add_argument("--caption-beams", type=positive_int, default=DEFAULT_CAPTION_BEAMS, help=f"beam search width, 1 for greedy (default {DEFAULT_CAPTION_BEAMS})")
    group.add_argument("--caption-max-tokens", type=positive_int, default=DEFAULT_CAPTION_MAX_TOKENS, help=f"longest caption in tokens (default {DEFAULT_CAPTION_MAX_TOKENS})")


def flavours_of(args) -> tuple[str, ...]:
    """--flavours as a tuple of names; none at all is a user's mistake."""
    flavours = tuple(part.strip() for part in args.flavours.split(",") if part.strip())
    if not flavours:
        raise ValueError("--flavours names no vocabulary")
    return flavours


def add_parsers(commands) -> None:
    from engine.cli import add_engine_arguments

    caption = commands.add_parser(
        "caption",
        help="caption every view (or every plain image) and build CLIP-Interrogator prompts; writes CSV or Parquet",
        description=(
            "Cut each panorama's views (--views) at the captioner's size, caption each, and make its interrogator prompt: "
            "the caption, then CLIP's top label in each --flavours vocabulary, in order. Writes one row per view (id, view, "
            "yaw, pitch, caption, prompt, each flavour's label and probability) to OUT (.csv, spreadsheet-safe, or .parquet, "
            "the results schema plus caption and prompt). An image that is not 2:1 is captioned whole with --plain-if-not-2to1; "
            "--plain reads every image whole."
        ),
    )
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="equirectangular panoramas (or plain images with --plain)")
    caption.add_argument("--out", required=True, type=Path, metavar="FILE", help="FILE.csv or FILE.parquet")
    add_captioner_arguments(caption)
    plain = caption.add_mutually_exclusive_group()
    plain.add_argument("--plain", action="store_true", help="every input is a plain image: caption it whole")
    plain.add_argument("--plain-if-not-2to1", action="store_true", help="caption an image whole when it is not 2:1")
    caption.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(caption, exclude=("vocabularies",))  # the flavours are its vocabularies

    from engine.dream.params import MODES, TranslateParams

    defaults = TranslateParams()
    translate = commands.add_parser(
        "translate",
        help="image -> caption -> image -> caption ... for N rounds, with CLIP image and text drift",
        description=(
            "Round 1 captions each input (a plain image as it is, a 2:1 panorama's --view). Each later round makes an image "
            "from the previous text (txt2img, or img2img from the previous image) with seed + round, and captions it. "
            "Writes DIR/<stem>/round_NNN.png, DIR/<stem>.mp4, DIR/<stem>-contact.png, DIR/<stem>-drift.csv and DIR/translate.json."
        ),
    )
    translate.add_argument("images", nargs="+", metavar="IMAGE", help="plain images or equirectangular panoramas")
    translate.add_argument("--rounds", type=int, default=defaults.rounds, help=f"rounds of translation, the first being the input's caption (default {defaults.rounds})")
    translate.add_argument("--mode", choices=MODES, default=defaults.mode, help=f"how text becomes an image (default {defaults.mode})")
    translate.add_argument("--strength", type=float, default=defaults.strength, help=f"img2img strength in (0, 1] (default {defaults.strength})")
    translate.add_argument("--steps", type=int, default=defaults.steps, help=f"denoising steps (default {defaults.steps})")
    translate.add_argument("--guidance", type=float, default=defaults.guidance, help=f"classifier-free guidance scale (default {defaults.guidance})")
    translate.add_argument("--seed", type=int, default=defaults.seed, help="round r uses seed + r (default 0)")
    translate.add_argument("--view", type=float, default=0.0, metavar="YAW", help="for a panorama: the yaw of the 90-degree view to start from (default 0)")
    translate.add_argument("--plain", action="store_true", help="read every input as a plain image, even a 2:1 one")
    translate.add_argument("--out", required=True, type=Path, metavar="DIR")
    translate.add_argument("--sd-model", default=None, metavar="DIR", help="a local diffusers folder")
    add_captioner_arguments(translate, flavours=False)
    translate.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(translate, exclude=("seed", "vocabularies"))


def run(args: argparse.Namespace) -> int | None:
    if args.command not in COMMANDS:
        return None
    return _caption(args) if args.command == "caption" else _translate(args)


def _captioner(args, config):
    from engine.models.caption import Captioner, CaptionModelError, check_generation

    check_generation(args.caption_beams, args.caption_max_tokens)
    if not args.caption_model:
        raise CaptionModelError("no captioner: pass --caption-model DIR (a local transformers folder; "
                                "`mimetic models make-tiny DIR` writes a tiny one to DIR/caption)")
    return lambda: Captioner(args.caption_model, device=config.device, precision=config.precision, beams=args.caption_beams,
                             max_tokens=args.caption_max_tokens)


def _caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.cli import config_from_args
    from engine.dream.interrogate import interrogate, write_captions
    from engine.pipeline import Engine, Panorama
    from engine.vocab import load_vocabulary

    flavours = flavours_of(args)
    names = tuple(load_vocabulary(name).name for name in flavours)  # an unknown one fails here, before any model
    if args.out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"--out {args.out}: the captions file must end in .csv or .parquet")
    config = config_from_args(args)
    make_captioner = _captioner(args, config)
    config.vocabularies = flavours
    engine = Engine(config)
    captioner = make_captioner()
    plain = True if args.plain else (None if args.plain_if_not_2to1 else False)
    inputs = [Panorama(id=str(path), data=path) for path in args.images]
    with tqdm(total=len(inputs), unit="image", desc="caption", file=sys.stderr, disable=args.quiet, dynamic_ncols=True) as bar:
        captioned = interrogate(engine, captioner, inputs, names, plain=plain, progress=bar.update)
    write_captions(captioned, args.out, names, engine.config)
    failed = [c for c in captioned if c.error]
    for item in failed:
        print(item.error, file=sys.stderr)
    views = sum(len(c.captions) for c in captioned)
    print(f"{views} captions of {len(captioned) - len(failed)} of {len(captioned)} images -> {args.out}")
    return 1 if failed else 0


def _translate(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from engine.cli import config_from_args
    from engine.dream.cli import _dreamer
    from engine.dream.translate import TranslateParams, save_translate, translate, translate_inputs
    from engine.pipeline import Engine, Panorama

    params = TranslateParams(rounds=args.rounds, mode=args.mode, strength=args.strength, steps=args.steps,
                             guidance=args.guidance, seed=args.seed)
    params.check()
    config = config_from_args(args)
    config.seed, config.vocabularies = args.seed, ()
    make_captioner = _captioner(args, config)
    args.size = None
    dreamer = _dreamer(args, config)
    engine, captioner = Engine(config), make_captioner()
    items = [Panorama(id=str(path), data=path) for path in args.images]
    images, failed = translate_inputs(engine, items, yaw=args.view, size=dreamer.size, plain=args.plain)
    for row in failed:
        print(row["error"], file=sys.stderr)
    sources = [image_id for image_id, _ in images]
    started = time.perf_counter()
    with tqdm(total=len(images) * params.rounds, unit="round", desc="translate", file=sys.stderr, disable=args.quiet,
              dynamic_ncols=True) as bar:
        runs = translate(engine, dreamer, captioner, images, params, progress=bar.update) if images else []
    save_translate(runs, args.out, engine=engine, dreamer=dreamer, captioner=captioner, params=params, sources=sources,
                   failed=failed, seconds=time.perf_counter() - started)
    print(f"{len(runs)} of {len(args.images)} images translated for {params.rounds} rounds -> {args.out}/translate.json")
    return 1 if failed else 0
