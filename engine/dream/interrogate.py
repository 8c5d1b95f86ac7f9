"""Captions and interrogator prompts over views: what a captioner says of each view, and what CLIP adds.

    from engine.dream.interrogate import interrogate, write_captions
    rows = interrogate(engine, captioner, [Panorama(id="p1", data="rome/p1.jpg")], flavours=("mediums", "movements", "styles"))
    rows[0].captions[0], rows[0].prompts[0]   # 'a street with a church', 'a street with a church, a photograph, Realism, Baroque architecture'
    write_captions(rows, "captions.csv")      # or .parquet (the results schema plus caption and prompt)

CLIP Interrogator's recipe, batched and recorded: the prompt is the caption, then the top CLIP label
of each flavour vocabulary, in the order given. Each panorama is decoded once; the engine cuts and
reads its views for CLIP (the flavours are its zero-shot readings, with their probabilities), and the
captioner's kernel cuts the same views at the captioner's size with its own normalisation. A plain
(non-panoramic) image is read whole: by the captioner after one antialiased resize, and by CLIP the
same way (``plain=True``, or ``plain=None`` to treat any image that is not 2:1 as plain).

Decoding is deterministic (beam search without sampling), so two runs give the same rows.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.decode import DecodeError, decode_image, required_width
from engine.dream.core import clip_embed, from_uint8
from engine.models.caption import Captioner, check_generation
from engine.pipeline import Engine, Panorama
from engine.results import SCHEMA, rows_table, write_csv
from engine.types import Prepared
from kernels import ViewSpec

PLAIN_VIEW = ViewSpec(0.0, 0.0, 0.0, 90.0, 1, 1)  # stands for "the whole image" in a plain image's row


@dataclass
class Captioned:
    """One input's captions: per view, its caption, its interrogator prompt and its flavour labels."""

    id: str
    views: list[ViewSpec] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    flavours: list[dict[str, tuple[str, float]]] = field(default_factory=list)  # per view: vocabulary -> (top label, p)
    embeddings: torch.Tensor | None = None  # (N, D) CLIP embeddings of the views (or of the plain image)
    plain: bool = False
    error: str | None = None


def interrogator_prompt(caption: str, flavours: dict[str, tuple[str, float]], order: Sequence[str]) -> str:
    """The caption, then each flavour's top label in ``order``, joined by ", " (an empty caption is left out)."""
    return ", ".join(part for part in [caption, *(flavours[name][0] for name in order)] if part)


def interrogate(engine: Engine, captioner: Captioner, panoramas: Iterable[Panorama], flavours: Sequence[str],
                *, plain: bool | None = False, progress: Callable[[int], None] | None = None) -> list[Captioned]:
    """Caption every view of every input (or every plain image whole); a bad input gets its error and the rest go on.

    ``flavours`` must be among the engine's vocabularies. ``progress`` is called with 1 per input done.
    """
    missing = [name for name in flavours if name not in engine.vocabularies]
    if missing:
        raise ValueError(f"flavour vocabularies {', '.join(missing)} are not loaded by the engine (its vocabularies: "
                         f"{', '.join(engine.vocabularies)})")
    out = []
    for item in panoramas:
        try:
            out.append(_one(engine, captioner, item, flavours, plain))
        except DecodeError as exc:
            out.append(Captioned(id=item.id, error=str(exc)))  # a DecodeError names its item
        except ValueError as exc:
            out.append(Captioned(id=item.id, error=f"{item.id}: {exc}"))
        if progress is not None:
            progress(1)
    return out


def _one(engine: Engine, captioner: Captioner, item: Panorama, flavours: Sequence[str], plain: bool | None) -> Captioned:
    prepared = None
    if plain is not True:
        # The Engine's one input stage: checked once, decoded once, at the width the denser of CLIP's and
        # the captioner's views needs; the Engine then embeds the decoded Prepared without checking it again.
        width = caption_width(engine, captioner)
        try:
            prepared = engine.decode(engine.prepare(item, min_width=width, host=True))
        except DecodeError as refused:
            if plain is False:
                raise
            image = decode_image(item.data, name=item.id, max_pixels=engine.config.max_pixels)
            if image.shape[1] == 2 * image.shape[0]:
                raise refused from None  # a panorama refused for another reason: that reason stands
    else:
        image = decode_image(item.data, name=item.id, max_pixels=engine.config.max_pixels)
    if prepared is not None:
        return caption_batch(engine, captioner, [prepared], [flavours])[0]
    # A plain image, read whole.
    captions = captioner.caption(captioner.pixels_of([image]))
    embeddings = clip_embed(engine, from_uint8(image[None]))
    readings = _top(engine, embeddings, flavours)
    prompts = [interrogator_prompt(caption, reading, flavours) for caption, reading in zip(captions, readings, strict=True)]
    return Captioned(id=item.id, views=[PLAIN_VIEW], captions=captions, prompts=prompts, flavours=readings,
                     embeddings=embeddings, plain=True)


def caption_width(engine: Engine, captioner: Captioner) -> int:
    """The width to decode a panorama at for captions (``Engine.prepare(..., min_width=...)``): what the
    denser of CLIP's and the captioner's views needs."""
    return max(engine.min_decode_width, required_width(captioner.views(engine.views)))


def caption_batch(engine: Engine, captioner: Captioner, prepared: Sequence[Prepared], flavours: Sequence[Sequence[str]],
                  *, beams: int | None = None, max_tokens: int | None = None) -> list[Captioned]:
    """Caption the views of decoded panoramas together: one engine call for CLIP's readings, one captioner
    call for every view (a server's requests from several streams, batched), as ``interrogate`` does one.

    ``prepared``: through ``Engine.prepare(..., min_width=caption_width(...), host=True)`` and
    ``Engine.decode``; checked no more. ``flavours``: each item's flavour vocabularies, among the engine's,
    in prompt order. ``beams`` and ``max_tokens`` override the captioner's own for this call. A failed
    item comes back in place with ``error``.
    """
    if not prepared:
        return []
    if beams is not None or max_tokens is not None:
        check_generation(beams or captioner.beams, max_tokens or captioner.max_tokens)
        captioner = copy.copy(captioner)  # the same model, other decoding settings
        captioner.beams, captioner.max_tokens = beams or captioner.beams, max_tokens or captioner.max_tokens
    results = engine.embed(list(prepared), captioner=captioner)  # CLIP and the captioner on the same views
    out, count = [], len(engine.views)
    for item, result, names in zip(prepared, results, flavours, strict=True):
        if result.error is not None:
            out.append(Captioned(id=item.id, error=result.error))
            continue
        mine = result.captions
        readings = [{name: result.readings[name]["views"][n][0] for name in names} for n in range(count)]
        prompts = [interrogator_prompt(caption, reading, names) for caption, reading in zip(mine, readings, strict=True)]
        out.append(Captioned(id=item.id, views=result.views, captions=mine, prompts=prompts, flavours=readings,
                             embeddings=result.embeddings))
    return out


def _top(engine: Engine, embeddings: torch.Tensor, flavours: Sequence[str]) -> list[dict[str, tuple[str, float]]]:
    """Each row's top label per flavour vocabulary, by the engine's own zero-shot rule: softmax(100 cos)."""
    from engine.models.clip import ZERO_SHOT_LOGIT_SCALE

    out: list[dict[str, tuple[str, float]]] = [{} for _ in range(len(embeddings))]
    for name in flavours:  # each vocabulary's prompts embedded once, for every row
        labels = engine.vocabularies[name].labels
        text = torch.nn.functional.normalize(engine.embed_text(engine.vocabularies[name].prompts()).float(), dim=1)
        probabilities, best = (ZERO_SHOT_LOGIT_SCALE * embeddings.float() @ text.T).softmax(dim=-1).max(dim=-1)
        for row, (p, index) in enumerate(zip(probabilities.tolist(), best.tolist(), strict=True)):
            out[row][name] = (labels[index], p)
    return out


# -- writing -----------------------------------------------------------------------------------------

def caption_rows(captioned: Sequence[Captioned], flavours: Sequence[str]) -> list[dict]:
    """One row per view: id, view, yaw, pitch, caption, prompt, each flavour's label and probability; one per failure."""
    rows = []
    for item in captioned:
        if item.error is not None:
            rows.append({"id": item.id, "error": item.error})
            continue
        for k, (view, caption, prompt) in enumerate(zip(item.views, item.captions, item.prompts, strict=True)):
            row = {"id": item.id, "view": None if item.plain else k, "yaw": None if item.plain else view.yaw,
                   "pitch": None if item.plain else view.pitch, "caption": caption, "prompt": prompt}
            for name in flavours:
                row[name], row[f"{name}_probability"] = item.flavours[k][name]
            rows.append(row)
    return rows


def write_captions(captioned: Sequence[Captioned], path: str | os.PathLike, flavours: Sequence[str], engine_config=None) -> Path:
    """``.csv`` (spreadsheet-safe) or ``.parquet`` (the results schema's view rows plus caption and prompt)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        fields = ["id", "view", "yaw", "pitch", "caption", "prompt", *(f"{n}{s}" for n in flavours for s in ("", "_probability")), "error"]
        return write_csv(path, caption_rows(captioned, flavours), fields)
    if path.suffix.lower() != ".parquet":
        raise ValueError(f"{path}: the captions file must end in .csv or .parquet")
    return _write_parquet(captioned, path, flavours, engine_config)


CAPTION_SCHEMA = pa.schema([*SCHEMA, pa.field("caption", pa.string()), pa.field("prompt", pa.string())])


def _write_parquet(captioned: Sequence[Captioned], path: Path, flavours: Sequence[str], engine_config) -> Path:
    """The results schema's view rows (``rows_table``) with each view's caption and prompt, written atomically."""
    rows, labels, embeddings = [], [], []
    for item in captioned:
        base = {"id": item.id, "meta": "{}"}
        if item.error is not None:
            rows.append({**base, "kind": "error", "error": item.error})
            labels.append(None)
            embeddings.append(None)
            continue
        for k, view in enumerate(item.views):
            where = {} if item.plain else {"view": k, "yaw": view.yaw, "pitch": view.pitch, "roll": view.roll,
                                           "fov": view.fov, "width": view.width, "height": view.height}
            rows.append({**base, **where, "kind": "view", "caption": item.captions[k], "prompt": item.prompts[k]})
            labels.append({name: [item.flavours[k][name]] for name in flavours})
            embeddings.append(item.embeddings[k].float().numpy().astype(np.float16))
    table = rows_table(rows, labels, embeddings, schema=CAPTION_SCHEMA, engine_config=engine_config, table="captions")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
