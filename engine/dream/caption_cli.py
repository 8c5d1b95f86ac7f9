"""The ``mimetic caption`` command: a thin shell over ``engine.dream.interrogate``.

    mimetic caption PANO [PANO ...] --out captions.csv [--caption-model DIR] [--flavours mediums,movements,styles] [--plain]

A folder of images to a captions CSV is one command: ``mimetic caption photos/*.jpg --plain --out captions.csv``.
Parameters are checked before any model loads; a bad one is one line and exit status 2. An input that
fails gets its row with ``error`` and the others go on (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("caption",)
DEFAULT_FLAVOURS = ("mediums", "movements", "styles")


def add_parsers(commands) -> None:
    from engine.cli import add_engine_arguments, positive_int
    from engine.models.caption import DEFAULT_BEAMS, DEFAULT_MAX_TOKENS

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
    caption.add_argument("--caption-model", default=None, metavar="DIR", help="a local transformers captioner folder (BLIP, or any AutoModelForImageTextToText)")
    caption.add_argument("--flavours", default=",".join(DEFAULT_FLAVOURS), metavar="VOCABS",
                         help=f"comma-separated vocabularies whose top labels follow the caption (default {','.join(DEFAULT_FLAVOURS)})")
    caption.add_argument("--caption-beams", type=positive_int, default=DEFAULT_BEAMS, help=f"beam search width, 1 for greedy (default {DEFAULT_BEAMS})")
    caption.add_argument("--caption-max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, help=f"longest caption in tokens (default {DEFAULT_MAX_TOKENS})")
    plain = caption.add_mutually_exclusive_group()
    plain.add_argument("--plain", action="store_true", help="every input is a plain image: caption it whole")
    plain.add_argument("--plain-if-not-2to1", action="store_true", help="caption an image whole when it is not 2:1")
    caption.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(caption, exclude=("vocabularies",))  # the flavours are its vocabularies


def run(args: argparse.Namespace) -> int | None:
    if args.command not in COMMANDS:
        return None
    from tqdm import tqdm

    from engine.cli import config_from_args
    from engine.dream.interrogate import interrogate, write_captions
    from engine.models.caption import Captioner, CaptionModelError, check_generation
    from engine.pipeline import Engine, Panorama
    from engine.vocab import load_vocabulary

    flavours = tuple(part.strip() for part in args.flavours.split(",") if part.strip())
    if not flavours:
        raise ValueError("--flavours names no vocabulary")
    names = tuple(load_vocabulary(name).name for name in flavours)  # an unknown one fails here, before any model
    if args.out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"--out {args.out}: the captions file must end in .csv or .parquet")
    check_generation(args.caption_beams, args.caption_max_tokens)
    if not args.caption_model:
        raise CaptionModelError("no captioner: pass --caption-model DIR (a local transformers folder; "
                                "`mimetic models make-tiny DIR` writes a tiny one to DIR/caption)")
    config = config_from_args(args)
    config.vocabularies = flavours
    engine = Engine(config)
    captioner = Captioner(args.caption_model, device=config.device, beams=args.caption_beams, max_tokens=args.caption_max_tokens)
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
