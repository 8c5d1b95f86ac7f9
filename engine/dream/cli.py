"""The ``mimetic dream``, ``walk`` and ``loop`` commands: thin shells over ``engine.dream``.

    mimetic dream PANO [PANO ...] (--prompt TEXT | --from-labels styles,periods [--template T] | --prompt-from caption) --out DIR
    mimetic walk --keyframes walk.yaml --out walk.mp4
    mimetic loop IMAGE [IMAGE ...] --iterations 100 --strength 0.3 --out DIR

``engine.cli`` wires them in with ``add_parsers(commands)`` and ``run(args)``. Parameters are checked
before any model loads, and a bad one raises ``ValueError``: ``engine.cli.main`` prints it as one line
with exit status 2. An input that fails is reported with its name and the others go on (exit status 1).
Progress (a bar per view, frame or iteration, with an ETA) goes to stderr; ``--quiet`` turns it off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

COMMANDS = ("dream", "walk", "loop")


def add_parsers(commands) -> None:
    """Add ``dream``, ``walk`` and ``loop`` to the ``mimetic`` command's subparsers.

    Every default is read from the parameters' dataclasses (``engine.dream.params``), which hold them once.
    """
    from engine.cli import add_engine_arguments
    from engine.dream.caption_cli import add_captioner_arguments
    from engine.dream.params import PROMPT_SOURCES, DreamParams, LoopParams, WalkParams

    dreams, walks, loops = DreamParams(), WalkParams(), LoopParams()

    dream = commands.add_parser(
        "dream",
        help="img2img of every view of each panorama with Stable Diffusion, with CLIP mimesis scores",
        description=(
            "Cut each panorama's views (--views) at the model's size, dream each with img2img from one --prompt, from "
            "CLIP's top label in each --from-labels vocabulary (through --template), or from each view's interrogator prompt "
            "(--prompt-from caption: its caption, then CLIP's top label in each --flavours vocabulary), and score each dream "
            "with CLIP. "
            "Writes DIR/<stem>_<index>_y<yaw>_p<pitch>_view.png and _dream.png (and _stepNNN.png with --trajectory-every) "
            "and DIR/dreams.json, the record of every parameter, seed, prompt and score."
        ),
    )
    dream.add_argument("panos", nargs="+", metavar="PANO", help="equirectangular panorama files")
    source = dream.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt for every view")
    source.add_argument("--from-labels", metavar="VOCABS", help="comma-separated vocabularies (names or files) whose top labels make each view's prompt; KEY=VOCABULARY names its placeholder")
    source.add_argument("--prompt-from", choices=PROMPT_SOURCES, help="caption: each view's interrogator prompt (needs --caption-model)")
    dream.add_argument("--template", help='prompt template over the vocabularies, e.g. "a photograph of {styles}, {periods}" (the default), or with --from-labels style=styles,place=urban,period=periods "a photograph of a {style} {place}, {period}"')
    dream.add_argument("--strength", type=float, default=dreams.strength, help=f"img2img strength in (0, 1] (default {dreams.strength:g})")
    dream.add_argument("--steps", type=int, default=dreams.steps,
                       help=f"denoising steps of the full schedule (default {dreams.steps}; img2img runs steps x strength)")
    dream.add_argument("--trajectory-every", type=int, default=dreams.trajectory_every, metavar="K", help="also keep the predicted clean image of every K-th step, with its CLIP drift")
    _add_generation_arguments(dream, dreams)
    dream.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    add_engine_arguments(dream, exclude=("seed",))  # one --seed: the generators' and the random weights'
    _add_model_arguments(dream, dreams.batch_size)
    add_captioner_arguments(dream)

    walk = commands.add_parser(
        "walk",
        help="a latent walk between keyframed prompts and seeds, rendered to MP4",
        description=(
            "Read keyframes (frame, prompt, seed) from a YAML or JSON file, interpolate the start noise by slerp and the "
            "prompt embeddings by lerp, render every frame with text2img, and write OUT (.mp4), OUT-contact.png and "
            "OUT.json. Flags override the file's settings."
        ),
    )
    walk.add_argument("--keyframes", required=True, type=Path, help="YAML/JSON: keyframes: [{frame, prompt, seed}, ...] and optional steps, guidance, negative_prompt, fps, batch_size")
    walk.add_argument("--out", required=True, type=Path, metavar="FILE.mp4")
    # None: the keyframes file's setting, else WalkParams' default.
    walk.add_argument("--steps", type=int, default=None, help=f"denoising steps per frame (default {walks.steps})")
    walk.add_argument("--guidance", type=float, default=None, help=f"classifier-free guidance scale (default {walks.guidance:g})")
    walk.add_argument("--negative-prompt", default=None)
    walk.add_argument("--fps", type=int, default=None, help=f"frames per second of the MP4 (default {walks.fps})")
    walk.add_argument("--frames", type=Path, default=None, metavar="DIR", help="also write every frame as a PNG here")
    add_engine_arguments(walk, only=("device", "attention", "compile"))  # a walk runs no CLIP: no CLIP flags
    _add_model_arguments(walk, walks.batch_size, unset=True)  # unset: the keyframes file may give it

    loop = commands.add_parser(
        "loop",
        help="apply img2img to its own output again and again, recording CLIP drift from the original",
        description=(
            "Centre-crop each image to a square at the model's size, then feed it through img2img --iterations times, "
            "each time on the previous output. Writes DIR/<stem>/frame_NNNN.png, DIR/<stem>.mp4, DIR/<stem>-contact.png, "
            "DIR/<stem>-drift.csv and DIR/loop.json (every parameter, seed and drift value)."
        ),
    )
    loop.add_argument("images", nargs="+", metavar="IMAGE", help="any images (views, dreams, paintings)")
    loop.add_argument("--iterations", type=int, default=loops.iterations, help=f"K: times img2img is applied (default {loops.iterations})")
    loop.add_argument("--strength", type=float, default=loops.strength, help=f"img2img strength in (0, 1] (default {loops.strength:g})")
    loop.add_argument("--steps", type=int, default=loops.steps, help=f"denoising steps of the full schedule (default {loops.steps})")
    loop.add_argument("--prompt", default=loops.prompt, help=f'prompt for every iteration (default "{loops.prompt}": the model alone)')
    loop.add_argument("--fps", type=int, default=loops.fps, help=f"frames per second of the MP4 (default {loops.fps})")
    _add_generation_arguments(loop, loops)
    loop.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    add_engine_arguments(loop, exclude=("seed",))
    _add_model_arguments(loop, loops.batch_size)


def _add_generation_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """--guidance, --negative-prompt and --seed, with the defaults of ``defaults`` (DreamParams or LoopParams)."""
    parser.add_argument("--guidance", type=float, default=defaults.guidance,
                        help=f"classifier-free guidance scale (default {defaults.guidance:g}; <= 1 turns it off)")
    parser.add_argument("--negative-prompt", default=defaults.negative_prompt, help="negative prompt (default none)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"generator seed, and the seed of --random-weights' initialisation (default {defaults.seed})")


def _add_model_arguments(parser: argparse.ArgumentParser, batch_size: int, *, unset: bool = False) -> None:
    """The Stable Diffusion model's own flags, which only dream, walk and loop have, and --quiet.

    ``batch_size`` is --sd-batch-size's default; with ``unset`` the flag stays None when not given, so
    that another source (walk's keyframes file) can set it before that default applies.
    """
    group = parser.add_argument_group("stable diffusion")
    group.add_argument("--sd-model", default=None, metavar="DIR", help="a local diffusers folder (model_index.json, unet/, vae/, ...)")
    group.add_argument("--sd-batch-size", type=int, default=None if unset else batch_size, help=f"images per diffusion call (default {batch_size})")
    group.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of 8 (default: the model's own, 512 for SD 1.5)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def make_tiny_sd(directory: str | Path) -> Path:
    """For ``mimetic models make-tiny DIR``: write the tiny Stable Diffusion to DIR/sd and say how to use it."""
    from engine.models.tiny_sd import make_tiny_sd as make

    path = make(directory)
    print(f"tiny untrained Stable Diffusion written to {path}; load it with --sd-model {path}")
    return path


def run(args: argparse.Namespace) -> int | None:
    """Run ``args.command`` if it is one of ours; None otherwise."""
    if args.command not in COMMANDS:
        return None
    return {"dream": _dream, "walk": _walk, "loop": _loop}[args.command](args)  # errors: engine.cli.main


def _progress(args, total: float, unit: str):
    """A tqdm bar on stderr counting ``unit``s, advanced in fractions as denoising steps finish; off with --quiet."""
    from tqdm import tqdm

    return tqdm(
        total=total, unit=unit, desc=args.command, file=sys.stderr, disable=args.quiet, dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} " + unit + "s [{elapsed}<{remaining}, {rate_fmt}]",
    )


def _dreamer(args, config):
    from engine.models.diffusion import DiffusionModelError, Dreamer, check_size

    if args.size is not None:
        check_size(args.size)
    if not args.sd_model:
        raise DiffusionModelError("no Stable Diffusion model: pass --sd-model DIR (a local diffusers folder; `mimetic models make-tiny DIR` writes a tiny one to DIR/sd)")
    return Dreamer(args.sd_model, device=config.device, attention=config.attention, compile=config.compile, size=args.size,
                   precision=config.precision)


def _dream(args) -> int:
    from tqdm import tqdm

    from engine.cli import config_from_args
    from engine.dream.caption_cli import _captioner, flavours_of
    from engine.dream.dream import dream_iter, save_dreams
    from engine.dream.params import DreamParams
    from engine.pipeline import Engine, Panorama

    labels = tuple(part.strip() for part in (args.from_labels or "").split(",") if part.strip())
    params = DreamParams(
        prompt=args.prompt, from_labels=labels, template=args.template, negative_prompt=args.negative_prompt,
        strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
        trajectory_every=args.trajectory_every, batch_size=args.sd_batch_size,
        prompt_from=args.prompt_from, flavours=flavours_of(args) if args.prompt_from else (),
    )
    params.check()  # before any model loads
    config = config_from_args(args)
    make_captioner = _captioner(args, config) if params.prompt_from else None  # its flags checked here too
    dreamer = _dreamer(args, config)
    engine = Engine(config)
    captioner = make_captioner() if make_captioner else None
    start = time.perf_counter()
    results = []
    with _progress(args, len(args.panos) * len(engine.views), "view") as bar:
        panoramas = [Panorama(id=path, data=path) for path in args.panos]
        for result in dream_iter(engine, dreamer, panoramas, params, progress=bar.update, captioner=captioner):
            if result.error:
                tqdm.write(result.error, file=sys.stderr)  # the error names its panorama
            else:
                mean = sum(d.scores["view_dream"] for d in result.dreams) / len(result.dreams)
                tqdm.write(f"{result.id}: {len(result.dreams)} dreams, mean view<->dream cosine {mean:.3f}; first prompt: {result.dreams[0].prompt!r}")
            results.append(result)
    record = save_dreams(results, args.out, engine=engine, dreamer=dreamer, params=params, seconds=time.perf_counter() - start,
                         captioner=captioner)
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} panoramas dreamt -> {record}")
    return 1 if failed else 0


def _walk(args) -> int:
    from engine.cli import config_from_args
    from engine.dream.params import WalkParams
    from engine.dream.walk import load_keyframes, save_walk, walk

    keyframes, settings = load_keyframes(args.keyframes)
    overrides = {"steps": args.steps, "guidance": args.guidance, "negative_prompt": args.negative_prompt, "fps": args.fps,
                 "batch_size": args.sd_batch_size}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        params = WalkParams(**settings)
        params.check()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{args.keyframes}: {exc}") from None
    dreamer = _dreamer(args, config_from_args(args))
    start = time.perf_counter()
    with _progress(args, keyframes[-1].frame + 1, "frame") as bar:
        result = walk(dreamer, keyframes, params, progress=bar.update)
    written = save_walk(result, args.out, dreamer=dreamer, frames_dir=args.frames, seconds=time.perf_counter() - start)
    print(f"{len(result.frames)} frames -> {written['video']} ({written['contact_sheet'].name}, {written['record'].name})")
    return 0


def _loop(args) -> int:
    from engine.cli import config_from_args
    from engine.decode import DecodeError, decode_image
    from engine.dream.loop import loop, save_loop
    from engine.dream.params import LoopParams
    from engine.pipeline import Engine

    params = LoopParams(
        iterations=args.iterations, strength=args.strength, steps=args.steps, guidance=args.guidance, prompt=args.prompt,
        negative_prompt=args.negative_prompt, seed=args.seed, batch_size=args.sd_batch_size, fps=args.fps,
    )
    params.check()
    config = config_from_args(args)
    images, failed = [], []
    for path in args.images:
        try:
            images.append((path, decode_image(path, max_pixels=config.max_pixels)))
        except DecodeError as exc:
            print(exc, file=sys.stderr)  # the error names its image
            failed.append({"source": path, "error": exc.reason})
    dreamer = _dreamer(args, config)
    engine = Engine(config)
    start = time.perf_counter()
    # Images are looped batch_size at a time, each batch through every iteration.
    total = params.iterations * -(-len(images) // params.batch_size)
    with _progress(args, total, "iteration") as bar:
        results = loop(engine, dreamer, images, params, progress=bar.update) if images else []
    record = save_loop(results, args.out, engine=engine, dreamer=dreamer, params=params,
                       sources=[path for path, _ in images], failed=failed, seconds=time.perf_counter() - start)
    for result in results:
        print(f"{result.id}: {len(result.seeds)} iterations, CLIP drift from the original {result.drift[-1]:.3f}")
    print(f"{len(results)} of {len(args.images)} images looped -> {record}")
    return 1 if failed else 0
