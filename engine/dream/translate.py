"""Machinic mimesis: image -> caption -> image -> caption ..., and what survives each round; and ``save_translate``.

    from engine.dream.translate import TranslateParams, translate, save_translate
    runs = translate(engine, dreamer, captioner, [("p1", image)], TranslateParams(rounds=10, seed=7))
    runs[0].rounds[3].text, runs[0].rounds[3].image_drift

Round 1 captions the input (a plain image as it is, or the panorama view the caller cut). Round r > 1
makes an image from round r - 1's text (txt2img from the round's seeded noise, or img2img from the
previous round's image at ``strength``) and captions it. Round r uses seed + r. Each round records
its text, image, seed, ``image_drift`` = 1 - cos(CLIP of the input, CLIP of this round's image) and
``text_drift`` = 1 - cos(CLIP text of round 1, CLIP text of this round). Inputs are batched: every
image's round r runs in one diffusion call and one captioner call. Deterministic: beam search
without sampling, and per-item generators.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.decode import DecodeError, decode_image, required_width
from engine.dream.core import (
    _header,
    _save_png,
    clip_embed,
    cosine,
    from_uint8,
    text_embed,
    to_uint8,
    write_mp4,
    write_record,
)
from engine.dream.loop import fit_square
from engine.dream.params import TranslateParams
from engine.models.caption import Captioner
from engine.models.diffusion import Dreamer
from engine.pipeline import Engine, Panorama
from engine.results import file_stems, write_csv
from engine.types import NotEquirectangularError
from kernels import ViewSpec

DRIFT_COLUMNS = ("round", "seed", "text", "image", "image_drift", "text_drift")


@dataclass
class Round:
    round: int
    text: str
    image: np.ndarray  # (S, S, 3) uint8
    seed: int | None  # None for round 1 (the input itself)
    image_drift: float
    text_drift: float


@dataclass
class Translation:
    id: str
    rounds: list[Round] = field(default_factory=list)


def translate_inputs(engine: Engine, items: Iterable[Panorama], *, yaw: float, size: int, plain: bool = False
                     ) -> tuple[list[tuple[str, np.ndarray]], list[dict]]:
    """Round 1's image of each input: a 2:1 panorama's 90-degree view at ``yaw``, ``size`` square, cut by the
    Engine from its one input stage; any other image (or every one, with ``plain``) whole, as it is.

    Returns the (id, uint8 image) pairs and a failure row ({id, source, error}) per input that could not be read.
    """
    view = ViewSpec(yaw, 0.0, 0.0, 90.0, size, size)
    images, failed = [], []
    for item in items:
        try:
            if plain:
                raise NotEquirectangularError(item.id, "read as a plain image")
            prepared = engine.decode(engine.prepare(item, min_width=required_width([view]), host=True))
            images.append((item.id, engine.view_images(prepared, [view])[0]))
        except NotEquirectangularError:
            try:
                images.append((item.id, decode_image(item.data, name=item.id, max_pixels=engine.config.max_pixels)))
            except DecodeError as exc:
                failed.append({"id": item.id, "source": item.id, "error": str(exc)})
        except DecodeError as exc:  # it names its item
            failed.append({"id": item.id, "source": item.id, "error": str(exc)})
    return images, failed


def translate(engine: Engine, dreamer: Dreamer, captioner: Captioner, images: Sequence[tuple[str, np.ndarray]],
              params: TranslateParams, progress: Callable[[float], None] | None = None) -> list[Translation]:
    """Run ``params.rounds`` rounds of translation on each (id, uint8 image); ``progress`` counts rounds of a batch."""
    params.check()
    out: list[Translation] = []
    for start in range(0, len(images), params.batch_size):
        chunk = images[start : start + params.batch_size]
        current = np.stack([fit_square(image, dreamer.size) for _, image in chunk])  # (B, S, S, 3)
        first = clip_embed(engine, from_uint8(current))
        texts = captioner.caption(captioner.pixels_of(list(current)))
        first_text = text_embed(engine, texts)
        runs = [Translation(id=image_id, rounds=[Round(1, texts[b], current[b], None, 0.0, 0.0)]) for b, (image_id, _) in enumerate(chunk)]
        if progress is not None:
            progress(1)
        for r in range(2, params.rounds + 1):
            seed = params.seed + r
            seeds = [seed] * len(chunk)
            if params.mode == "img2img":
                result = dreamer.img2img(from_uint8(current) * 2 - 1, prompts=texts, negative_prompt=params.negative_prompt,
                                         strength=params.strength, steps=params.steps, guidance=params.guidance, seeds=seeds)
            else:
                embeds = dreamer.encode_prompt(texts, params.negative_prompt)
                result = dreamer.txt2img(embeds, dreamer.noise(seeds), steps=params.steps, guidance=params.guidance)
            current = np.stack([to_uint8(image) for image in result.images])
            texts = captioner.caption(captioner.pixels_of(list(current)))
            image_drift = (1 - cosine(clip_embed(engine, from_uint8(current)), first)).tolist()
            text_drift = (1 - cosine(text_embed(engine, texts), first_text)).tolist()
            for b, run in enumerate(runs):
                run.rounds.append(Round(r, texts[b], current[b], seed, image_drift[b], text_drift[b]))
            if progress is not None:
                progress(1)
        out.extend(runs)
    return out


def contact_with_text(rounds: Sequence[Round], thumb: int = 192) -> np.ndarray:
    """Each round's image in a row, with its round number and text wrapped beneath it."""
    import textwrap

    from PIL import Image, ImageDraw

    lines = [textwrap.wrap(f"{r.round}: {r.text or '(empty caption)'}", width=max(8, thumb // 7))[:6] for r in rounds]
    text_height = 12 * max(len(wrapped) for wrapped in lines) + 8
    sheet = Image.new("RGB", (thumb * len(rounds), thumb + text_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (r, wrapped) in enumerate(zip(rounds, lines, strict=True)):
        sheet.paste(Image.fromarray(r.image).resize((thumb, thumb), Image.Resampling.LANCZOS), (k * thumb, 0))
        draw.multiline_text((k * thumb + 4, thumb + 4), "\n".join(wrapped), fill=(0, 0, 0), spacing=2)
    return np.asarray(sheet)


def save_translate(runs: Sequence[Translation], out_dir: str | os.PathLike, *, engine: Engine, dreamer: Dreamer,
                   captioner: Captioner, params: TranslateParams, sources: Sequence[str], failed: Sequence[dict] = (),
                   fps: int = 2, seconds: float = 0.0) -> Path:
    """Per input: ``<stem>/round_NNN.png``, ``<stem>.mp4``, ``<stem>-contact.png``, ``<stem>-drift.csv``; then ``translate.json``.

    ``translate.json`` has ``images``: one entry per input (``source``, ``error``, ``rounds``), failed ones included."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _header("translate", dreamer, engine, params, seconds)
    record["caption"] = captioner.info()
    record["images"] = []
    for run, source, stem in zip(runs, sources, file_stems([r.id for r in runs]), strict=True):
        folder = out / stem
        folder.mkdir(exist_ok=True)
        rows = []
        for r in run.rounds:
            name = _save_png(r.image, folder / f"round_{r.round:03d}.png")
            rows.append({"round": r.round, "text": r.text, "image": f"{stem}/{name}", "seed": r.seed,
                         "image_drift": round(r.image_drift, 6), "text_drift": round(r.text_drift, 6)})
        write_mp4(np.stack([r.image for r in run.rounds]), out / f"{stem}.mp4", fps)
        Image.fromarray(contact_with_text(run.rounds)).save(out / f"{stem}-contact.png")
        write_csv(out / f"{stem}-drift.csv", rows, DRIFT_COLUMNS)
        record["images"].append({"id": run.id, "source": source, "error": None, "rounds": rows})
    record["images"].extend({"id": f["id"], "source": f.get("source"), "error": f["error"], "rounds": []} for f in failed)
    return write_record(record, out / "translate.json")
