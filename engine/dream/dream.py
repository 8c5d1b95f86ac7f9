"""1-4. ``dream``: img2img of every view, prompts from CLIP, mimesis scores, trajectories; and ``save_dreams``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.decode import DecodeError, required_width
from engine.dream.core import (
    Progress,
    _header,
    _no_progress,
    _save_png,
    _scaled,
    clip_embed,
    cosine,
    text_embed,
    to_uint8,
    write_record,
)
from engine.dream.interrogate import interrogator_prompt
from engine.dream.params import DreamParams, flavour_vocabularies, label_vocabularies, prompt_from_labels
from engine.models.caption import Captioner
from engine.models.diffusion import Dreamer
from engine.pipeline import Engine, Panorama
from engine.results import file_stems
from engine.types import Prepared, error_message, item_meta
from kernels import ViewSpec

# ---------------------------------------------------------------------------------------------------
# Results.


@dataclass
class Trajectory:
    """The predicted clean image at every k-th denoising step, and where it sits in CLIP space."""

    steps: list[int]  # 1-based denoising steps
    frames: np.ndarray  # (T, S, S, 3) uint8
    drift: list[float]  # 1 - cos(view, frame): how far from the place it started
    prompt_cosine: list[float]  # cos(frame, prompt)


@dataclass
class Dream:
    """One view and its dream."""

    index: int  # the view's index in the engine's view set
    view: ViewSpec  # at the model's size
    prompt: str
    seed: int
    source: np.ndarray  # the view as the model saw it, (S, S, 3) uint8
    image: np.ndarray  # the dream, (S, S, 3) uint8
    scores: dict[str, float]  # view_dream, dream_prompt, view_prompt (CLIP cosines)
    labels: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # top-k per placeholder or flavour
    caption: str | None = None  # the captioner's reading of the view (prompt_from="caption")
    nsfw: bool | None = None  # the folder's safety checker's flag, when it has one
    trajectory: Trajectory | None = None


@dataclass
class DreamResult:
    """The dreams of one panorama's views; ``error`` names the item and the reason when it failed."""

    id: str
    dreams: list[Dream] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------
# 1-4. dream: img2img of every view, prompts from CLIP, mimesis scores, trajectories.


def dream(engine: Engine, dreamer: Dreamer, panoramas: Iterable[Panorama], params: DreamParams,
          progress: Progress | None = None, *, captioner: Captioner | None = None) -> list[DreamResult]:
    """Dream every view of every panorama; results in input order, a failed panorama in place with ``error``.

    ``progress``, if given, is called with the number of views done, in fractions as denoising steps
    finish (a failed panorama counts its views at once): its calls add up to panoramas x views.
    ``captioner`` reads each view for ``params.prompt_from == "caption"``.
    """
    return list(dream_iter(engine, dreamer, panoramas, params, progress, captioner=captioner))


def dream_iter(engine: Engine, dreamer: Dreamer, panoramas: Iterable[Panorama], params: DreamParams,
               progress: Progress | None = None, *, captioner: Captioner | None = None) -> Iterator[DreamResult]:
    """Like ``dream``, yielding each panorama's result as soon as its group is done. Parameters are
    checked here, at the call, not at the first result."""
    plan = _plan(engine, params)
    captioner = _needed(captioner, [plan])
    return _dream_groups(engine, dreamer, captioner, iter(panoramas), plan, progress or _no_progress)


def _needed(captioner: Captioner | None, plans) -> Captioner | None:
    """The captioner when some item's prompt is its caption (a ValueError without one), else None."""
    if not any(plan.params.prompt_from == "caption" for plan in plans):
        return None
    if captioner is None:
        raise ValueError("prompt_from='caption' needs a captioner (--caption-model DIR)")
    return captioner


# What must agree for views to share a diffusion call: the rest (prompt, labels, template, seed) is per view.
DIFFUSION_FIELDS = ("strength", "steps", "guidance", "negative_prompt", "trajectory_every", "batch_size")


def diffusion_key(params: DreamParams) -> tuple:
    return tuple(getattr(params, name) for name in DIFFUSION_FIELDS)


def dream_width(engine: Engine, dreamer: Dreamer) -> int:
    """The width to decode a panorama at for ``dream`` (``Engine.prepare(..., min_width=...)``): what the
    model's views need."""
    return required_width(dreamer.views(engine.views))


def dream_batch(engine: Engine, dreamer: Dreamer, items: Sequence[tuple[Panorama | Prepared, DreamParams]],
                progress: Progress | None = None, *, captioner: Captioner | None = None) -> list[DreamResult]:
    """Dream panoramas that each bring their own parameters (prompt or labels, template, seed) in shared
    diffusion calls, as ``dream`` dreams one run's: a server's requests from several streams, batched.

    Every item's parameters must agree on ``DIFFUSION_FIELDS`` (a ValueError otherwise) and are checked
    here. An item may be a ``Prepared`` already decoded (``Engine.prepare(..., min_width=dream_width(...),
    host=True)`` then ``Engine.decode``): it is checked and decoded no more. Each view's generator is
    seeded by its own item, so a view dreams the same whatever else is in the call. Results in input
    order, a failed item in place with ``error``. ``progress`` as for ``dream``; an exception it raises
    stops the diffusion call at that step and leaves this function with it.
    """
    if not items:
        return []
    keys = {diffusion_key(params) for _, params in items}
    if len(keys) > 1:
        raise ValueError(f"one diffusion call needs the same {', '.join(DIFFUSION_FIELDS)} for every item, got {sorted(keys, key=str)}")
    plans = [_plan(engine, params) for _, params in items]
    return _dream_group(engine, dreamer, [item for item, _ in items], plans, dream_width(engine, dreamer), progress or _no_progress,
                        _needed(captioner, plans))


@dataclass
class _Plan:
    """One item's parameters, checked, with the vocabularies and template its prompts come from."""

    params: DreamParams
    vocabularies: dict
    template: str | None


def _plan(engine: Engine, params: DreamParams) -> _Plan:
    vocabularies = params.check()
    if params.prompt_from == "caption":
        vocabularies = flavour_vocabularies(params.flavours)  # read like placeholders, keyed by name
    for vocabulary in vocabularies.values():
        if engine.vocabularies.get(vocabulary.name) != vocabulary:
            engine.add_vocabulary(vocabulary)
    return _Plan(params, vocabularies, params.resolved_template(vocabularies) if params.from_labels else None)


def _dream_groups(engine, dreamer, captioner, panoramas, plan: _Plan, progress) -> Iterator[DreamResult]:
    views = dreamer.views(engine.views)
    # A group is as many panoramas as fill one diffusion batch with their views (at least one).
    group_size = max(1, plan.params.batch_size // len(views))
    # Decoded once, at the width the densest of the SD and the captioner's views needs.
    min_width = max(required_width(views), required_width(captioner.views(engine.views)) if captioner else 0)
    group: list[Panorama] = []
    for item in panoramas:
        group.append(item)
        if len(group) == group_size:
            yield from _dream_group(engine, dreamer, group, [plan] * len(group), min_width, progress, captioner)
            group = []
    if group:
        yield from _dream_group(engine, dreamer, group, [plan] * len(group), min_width, progress, captioner)


def _decoded(engine: Engine, item, min_width: int) -> Prepared:
    if isinstance(item, Prepared) and item.pixels is not None:
        return item  # the caller's input stage ran already (a server's decode pool)
    return engine.decode(engine.prepare(item, min_width=min_width, host=True))


def _dream_group(engine, dreamer, group, plans: list[_Plan], min_width, progress, captioner=None) -> list[DreamResult]:
    # Decode each panorama once, for CLIP and SD alike, through the Engine's input stage (into host arrays,
    # at the width the SD views need); a failure stays with its item (by position).
    decoded, failed = [], {}
    for k, item in enumerate(group):
        try:
            decoded.append((k, item, _decoded(engine, item, min_width)))
        except (DecodeError, ValueError, TypeError) as exc:
            failed[k] = error_message(item, exc)

    # Prompts: one for every view, or each view's top label per vocabulary (or flavour), read by the engine
    # from its own views (the prepared panoramas are checked no more), after the view's caption.
    readings = {}
    labelled = [entry for entry in decoded if plans[entry[0]].vocabularies]
    if labelled:
        seen = engine.embed([prepared for _, _, prepared in labelled])
        for (k, _, _), result in zip(labelled, seen, strict=True):
            if result.error:
                failed[k] = result.error
            else:
                readings[k] = {key: result.readings[v.name]["views"] for key, v in plans[k].vocabularies.items()}
        decoded = [entry for entry in decoded if entry[0] not in failed]
    count = len(engine.views)
    if failed:
        progress(len(failed) * count)  # their views will not be dreamt: done, as far as the bar goes
    if not decoded:
        return [_failed(item, failed[k]) for k, item in enumerate(group)]

    captions = _captions(engine, captioner, [(k, p) for k, _, p in decoded if plans[k].params.prompt_from == "caption"], count)
    labels, prompts, seeds = [], [], []
    for k, _, _ in decoded:
        plan = plans[k]
        for n in range(count):
            top = {name: per_view[n] for name, per_view in readings.get(k, {}).items()}
            labels.append(top)
            if k in captions:
                flavours = {name: top[name][0] for name in plan.vocabularies}
                prompts.append(interrogator_prompt(captions[k][n], flavours, list(plan.vocabularies)))
            elif plan.template is not None:
                prompts.append(prompt_from_labels(plan.template, {v: top[v][0][0] for v in top}))
            else:
                prompts.append(plan.params.prompt)
            seeds.append(plan.params.seed)
    params = plans[decoded[0][0]].params  # the diffusion parameters every item shares

    # The same views the engine cuts, at the model's size, [-1, 1]; img2img across panoramas, batch by batch.
    rendered = dreamer.render(
        [p.pixels for _, _, p in decoded], engine.views, [p.yaw_offset for _, _, p in decoded], antialias=engine.config.antialias
    )
    flat = rendered.reshape(len(decoded) * count, *rendered.shape[2:])  # (M * N, 3, S, S)
    size = params.batch_size
    outputs = [
        dreamer.img2img(
            flat[i : i + size], prompts=prompts[i : i + size], negative_prompt=params.negative_prompt, strength=params.strength,
            steps=params.steps, guidance=params.guidance, seeds=seeds[i : i + size], every=params.trajectory_every,
            progress=_scaled(progress, len(prompts[i : i + size])),
        )
        for i in range(0, len(prompts), size)
    ]
    sources = (flat.float().cpu() / 2 + 0.5).clamp(0, 1)
    images = torch.cat([out.images for out in outputs])
    nsfw = [flag for out in outputs for flag in (out.nsfw or [None] * out.images.shape[0])]

    # Mimesis: CLIP cosines between the view, its dream and the prompt; and along each trajectory.
    view_emb, dream_emb, prompt_emb = clip_embed(engine, sources), clip_embed(engine, images), text_embed(engine, prompts)
    scores = {
        "view_dream": cosine(view_emb, dream_emb),
        "dream_prompt": cosine(dream_emb, prompt_emb),
        "view_prompt": cosine(view_emb, prompt_emb),
    }
    trajectories = _trajectories(engine, outputs, view_emb, prompt_emb) if params.trajectory_every else None

    specs = dreamer.views(engine.views)
    done = {}
    for m, (k, item, _) in enumerate(decoded):
        dreams = []
        for n in range(count):
            j = m * count + n
            dreams.append(
                Dream(
                    index=n, view=specs[n], prompt=prompts[j], seed=seeds[j], source=to_uint8(sources[j]),
                    image=to_uint8(images[j]), scores={name: float(values[j]) for name, values in scores.items()},
                    labels=labels[j], caption=captions[k][n] if k in captions else None, nsfw=nsfw[j],
                    trajectory=trajectories[j] if trajectories else None,
                )
            )
        done[k] = DreamResult(id=item.id, dreams=dreams, meta=dict(item.meta))
    return [done[k] if k in done else _failed(item, failed[k]) for k, item in enumerate(group)]


def _captions(engine, captioner, entries: list[tuple[int, Prepared]], count: int) -> dict[int, list[str]]:
    """{item: a caption per view}, every view of these items in the captioner's batches, cut from the same pixels."""
    if not entries:
        return {}
    cut = captioner.render([p.pixels for _, p in entries], engine.views, [p.yaw_offset for _, p in entries],
                           antialias=engine.config.antialias)
    captions = captioner.caption(cut.reshape(-1, *cut.shape[2:]))
    return {k: captions[m * count : (m + 1) * count] for m, (k, _) in enumerate(entries)}


def _failed(item, error: str) -> DreamResult:
    return DreamResult(id=str(getattr(item, "id", item)), meta=_meta(item), error=error)


def _trajectories(engine, outputs, view_emb, prompt_emb) -> list[Trajectory]:
    """Per item: its frames along the denoising, each CLIP-embedded against the view and the prompt."""
    per_item, start = [], 0
    for out in outputs:
        batch = out.images.shape[0]
        steps = [step for step, _ in out.trajectory]
        frames = torch.stack([images for _, images in out.trajectory], dim=1) if steps else torch.empty(batch, 0, 3, 1, 1)
        for b in range(batch):
            k = start + b
            emb = clip_embed(engine, frames[b]) if steps else torch.empty(0, view_emb.shape[1])
            per_item.append(
                Trajectory(
                    steps=steps,
                    frames=np.stack([to_uint8(f) for f in frames[b]]) if steps else np.zeros((0, 0, 0, 3), np.uint8),
                    drift=(1 - cosine(emb, view_emb[k])).tolist(),
                    prompt_cosine=cosine(emb, prompt_emb[k]).tolist(),
                )
            )
        start += batch
    return per_item


def _meta(item) -> dict:
    return dict(item_meta(item))


# ---------------------------------------------------------------------------------------------------
# Saving: images, video, contact sheets, and the record of every run.


def save_dreams(results: Sequence[DreamResult], out_dir: str | os.PathLike, *, engine: Engine, dreamer: Dreamer,
                params: DreamParams, seconds: float = 0.0, captioner: Captioner | None = None,
                vocabularies: dict | None = None) -> Path:
    """Write each view and dream as PNGs (and trajectory frames), and ``out_dir/dreams.json``; return its path.

    ``vocabularies``: {placeholder: vocabulary (name, template, labels_hash)} of ``params.from_labels``, where
    they were read elsewhere (a server's); by default they are loaded here."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocabularies = label_vocabularies(params.from_labels) if vocabularies is None else vocabularies
    record = _header("dream", dreamer, engine, params, seconds)
    record["template"] = params.resolved_template(vocabularies)
    if params.prompt_from == "caption" and captioner is not None:
        record["captioner"] = captioner.info()
        record["flavours"] = {v.name: {"template": v.template, "labels_sha256": v.labels_hash}
                              for v in flavour_vocabularies(params.flavours).values()}
    record["placeholders"] = {key: {"vocabulary": v.name, "template": v.template, "labels_sha256": v.labels_hash}
                              for key, v in vocabularies.items()}
    record["panoramas"] = []
    images = 0
    for stem, result in zip(file_stems([r.id for r in results]), results, strict=True):
        entry = {"id": result.id, "meta": result.meta, "error": result.error, "dreams": []}
        for d in result.dreams:
            name = f"{stem}_{d.index}_y{d.view.yaw:g}_p{d.view.pitch:g}"
            files = {"view": _save_png(d.source, out / f"{name}_view.png"), "dream": _save_png(d.image, out / f"{name}_dream.png")}
            row = {"view": d.index, **asdict(d.view), "prompt": d.prompt, "caption": d.caption, "seed": d.seed, "labels": d.labels,
                   "scores": d.scores, "nsfw": d.nsfw, "files": files}
            if d.trajectory is not None:
                frames = [_save_png(f, out / f"{name}_step{s:03d}.png") for s, f in zip(d.trajectory.steps, d.trajectory.frames, strict=True)]
                row["trajectory"] = {"steps": d.trajectory.steps, "drift": d.trajectory.drift,
                                     "prompt_cosine": d.trajectory.prompt_cosine, "files": frames}
            entry["dreams"].append(row)
            images += 1
        record["panoramas"].append(entry)
    record["images_per_s"] = images / seconds if seconds > 0 else None
    return write_record(record, out / "dreams.json")
