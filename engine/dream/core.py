"""Machine dreams: how Stable Diffusion recreates the places CLIP is shown, on the engine's own views.

    from engine import Engine, EngineConfig, Panorama
    from engine.dream.core import DreamParams, dream, save_dreams
    from engine.models.diffusion import Dreamer
    engine, dreamer = Engine(EngineConfig(clip_model="local-dir:models/clip")), Dreamer("models/sd")
    results = dream(engine, dreamer, [Panorama(id="p1", data="rome/p1.jpg")],
                    DreamParams(from_labels=("styles", "periods"), strength=0.6, steps=30, seed=7))
    results[0].dreams[0].prompt, results[0].dreams[0].scores   # 'a photograph of Baroque architecture, 17th century'

The operations, each one the method of the research it serves:

1. ``dream``: img2img of every view of every panorama (the engine's view directions, rendered by the
   kernel at the model's size with ``normalize="sd"``), batched across panoramas, with one prompt for
   all or
2. a prompt per view from CLIP's top zero-shot label in each vocabulary, through a template the user
   can change: ``"a photograph of {styles}, {periods}"`` (placeholders are vocabulary names), or with
   ``from_labels=("style=styles", "place=urban", "period=periods")``, "a photograph of a {style} {place}, {period}";
3. mimesis scores for each dream: CLIP cosine view<->dream (how far the imitation drifts) and
   dream<->prompt (how well it says what it was told), with view<->prompt as the baseline;
4. optionally its trajectory: the predicted clean image at every k-th denoising step, decoded and
   CLIP-embedded, giving a drift curve and frames;
5. ``walk``: keyframes (frame, prompt, seed) joined by slerp of the start noise and lerp of the prompt
   embeddings, rendered in batches (latent cinema);
6. ``loop``: img2img applied to its own output K times, with CLIP drift from the original each time.

Every run can be saved with its record (``save_dreams``, ``save_walk``, ``save_loop``): a JSON file of
every parameter, seed, prompt and score, so that it can be reproduced and compared with another.
CLIP embeddings of views and dreams are taken the same way (the image resized to CLIP's input with
antialiasing), so a score measures what the model changed, not a difference in resampling.
"""

from __future__ import annotations

import json
import math
import os
import string
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import __version__
from engine.decode import DecodeError, decode_image, required_width
from engine.models.diffusion import (
    Dreamer,
    check_guidance,
    check_steps,
    check_strength,
    img2img_steps,
)
from engine.pipeline import Engine, Panorama, check_equirectangular
from engine.results import file_stems, write_csv
from engine.vocab import Vocabulary, load_vocabulary
from kernels import ViewSpec

# Called with units of work done (views, frames or iterations), in fractions as denoising steps finish.
Progress = Callable[[float], None]
DRIFT_COLUMNS = ("iteration", "seed", "prompt", "drift", "step_drift", "prompt_cosine")  # a loop's <stem>-drift.csv

# ---------------------------------------------------------------------------------------------------
# Parameters: checked before any model is loaded, recorded with every result.


@dataclass
class DreamParams:
    """What ``dream`` does. One of ``prompt`` and ``from_labels``; ``template`` goes with ``from_labels``."""

    prompt: str | None = None
    # Vocabularies (bundled names or files) whose top label per view fills the template; "key=vocabulary"
    # names the placeholder ("style=styles" for "{style}"), otherwise it is the vocabulary's name.
    from_labels: tuple[str, ...] = ()
    template: str | None = None  # default: "a photograph of {key1}, {key2}, ..."
    negative_prompt: str = ""
    strength: float = 0.5  # fraction of the schedule re-noised: 0+ keeps the view, 1 ignores it
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0  # every view's generator starts from it: the same noise for every place
    trajectory_every: int | None = None  # k: keep the predicted clean image of every k-th step
    batch_size: int = 8  # images per diffusion call, views of several panoramas together

    def check(self) -> dict[str, Vocabulary]:
        """Raise ``ValueError`` on a bad parameter; return {placeholder: vocabulary} for ``from_labels``."""
        if (self.prompt is None) == (not self.from_labels):
            raise ValueError("give either a prompt or from_labels (vocabularies whose top labels make the prompt), not both or neither")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.template is not None and not self.from_labels:
            raise ValueError("a template fills in labels: it needs from_labels")
        steps_run = img2img_steps(check_steps(self.steps), check_strength(self.strength))
        check_guidance(self.guidance)
        _check_seed(self.seed)
        check_steps(self.batch_size, "batch_size")
        if self.trajectory_every is not None:
            check_steps(self.trajectory_every, "trajectory_every")
            if self.trajectory_every > steps_run:  # it would record no step at all, and say nothing
                raise ValueError(
                    f"trajectory_every (--trajectory-every) is {self.trajectory_every}, more than the {steps_run} denoising "
                    f"steps img2img runs (steps {self.steps} x strength {self.strength}), so no step would be recorded; "
                    f"give at most {steps_run}"
                )
        vocabularies = label_vocabularies(self.from_labels)
        if vocabularies:
            check_template(self.resolved_template(vocabularies), list(vocabularies))
        return vocabularies

    def resolved_template(self, vocabularies: dict[str, Vocabulary]) -> str | None:
        if not vocabularies:
            return None
        return self.template if self.template is not None else default_template(list(vocabularies))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


# ---------------------------------------------------------------------------------------------------
# Prompts from CLIP: the top zero-shot label per vocabulary, through a template.


def label_vocabularies(from_labels: Sequence[str]) -> dict[str, Vocabulary]:
    """``["styles", "place=urban", "my.txt"]`` -> {"styles": styles, "place": urban, "<name in my.txt>": ...}."""
    found: dict[str, Vocabulary] = {}
    for entry in from_labels:
        key, sep, source = entry.partition("=")
        vocabulary = load_vocabulary(source.strip() if sep else entry)  # unknown: ValueError naming it
        key = key.strip() if sep else vocabulary.name
        if not key.isidentifier():
            raise ValueError(f"{entry!r}: the placeholder {key!r} must be a plain name (letters, digits, _); write KEY=VOCABULARY")
        if key in found:
            raise ValueError(f"{entry!r}: the placeholder {{{key}}} is given twice in from_labels")
        found[key] = vocabulary
    return found


def default_template(names: Sequence[str]) -> str:
    return "a photograph of " + ", ".join("{" + name + "}" for name in names)


def check_template(template: str, names: Sequence[str]) -> None:
    """Every ``{placeholder}`` must name one of the vocabularies, and every vocabulary must be used."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for name, spec, conversion in fields:
        if name not in names:
            raise ValueError(
                f"template {template!r}: {{{name}}} is not one of the vocabularies given ({', '.join(names)}); "
                "placeholders are vocabulary names, or the KEY of KEY=VOCABULARY"
            )
        if spec or conversion:
            raise ValueError(f"template {template!r}: write {{{name}}} plainly, without a format spec or conversion")
    missing = [n for n in names if n not in {f for f, _, _ in fields}]
    if missing:
        raise ValueError(f"template {template!r} has no placeholder for {', '.join('{' + n + '}' for n in missing)}")


def prompt_from_labels(template: str, labels: dict[str, str]) -> str:
    """``template`` with each ``{vocabulary}`` replaced by that vocabulary's label."""
    return template.format_map(labels)


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
    labels: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # top-k per placeholder (from_labels)
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
          progress: Progress | None = None) -> list[DreamResult]:
    """Dream every view of every panorama; results in input order, a failed panorama in place with ``error``.

    ``progress``, if given, is called with the number of views done, in fractions as denoising steps
    finish (a failed panorama counts its views at once): its calls add up to panoramas x views.
    """
    return list(dream_iter(engine, dreamer, panoramas, params, progress))


def dream_iter(engine: Engine, dreamer: Dreamer, panoramas: Iterable[Panorama], params: DreamParams,
               progress: Progress | None = None) -> Iterator[DreamResult]:
    """Like ``dream``, yielding each panorama's result as soon as its group is done. Parameters are
    checked here, at the call, not at the first result."""
    vocabularies = params.check()
    for vocabulary in vocabularies.values():
        if engine.vocabularies.get(vocabulary.name) != vocabulary:
            engine.add_vocabulary(vocabulary)
    template = params.resolved_template(vocabularies)
    return _dream_groups(engine, dreamer, iter(panoramas), params, vocabularies, template, progress or _no_progress)


def _no_progress(_done: float) -> None:
    pass


def _dream_groups(engine, dreamer, panoramas, params, vocabularies, template, progress) -> Iterator[DreamResult]:
    views = dreamer.views(engine.views)
    # A group is as many panoramas as fill one diffusion batch with their views (at least one).
    group_size = max(1, params.batch_size // len(views))
    min_width = required_width(views)
    group: list[Panorama] = []
    for item in panoramas:
        group.append(item)
        if len(group) == group_size:
            yield from _dream_group(engine, dreamer, group, params, vocabularies, template, min_width, progress)
            group = []
    if group:
        yield from _dream_group(engine, dreamer, group, params, vocabularies, template, min_width, progress)


def _dream_group(engine, dreamer, group, params, vocabularies, template, min_width, progress) -> list[DreamResult]:
    # Decode each panorama once, for CLIP and SD alike; a failure stays with its item (by position).
    decoded, failed = [], {}
    for k, item in enumerate(group):
        try:
            decoded.append((k, item, _decode(item, engine.config.max_pixels, min_width)))
        except (DecodeError, ValueError, TypeError) as exc:
            failed[k] = _error_text(item, exc)

    # Prompts: one for every view, or each view's top label per vocabulary, read by the engine from its own views.
    readings = {}
    if vocabularies and decoded:
        seen = engine.embed([Panorama(id=item.id, data=pano, yaw_offset=item.yaw_offset) for _, item, pano in decoded])
        for (k, _, _), result in zip(decoded, seen, strict=True):
            if result.error:
                failed[k] = result.error
            else:
                readings[k] = {key: result.readings[v.name]["views"] for key, v in vocabularies.items()}
        decoded = [entry for entry in decoded if entry[0] not in failed]
    count = len(engine.views)
    if failed:
        progress(len(failed) * count)  # their views will not be dreamt: done, as far as the bar goes
    if not decoded:
        return [_failed(item, failed[k]) for k, item in enumerate(group)]

    labels, prompts = [], []
    for k, _, _ in decoded:
        for n in range(count):
            top = {name: per_view[n] for name, per_view in readings.get(k, {}).items()}
            labels.append(top)
            prompts.append(params.prompt if template is None else prompt_from_labels(template, {v: top[v][0][0] for v in top}))
    seeds = [params.seed] * len(prompts)

    # The same views the engine cuts, at the model's size, [-1, 1]; img2img across panoramas, batch by batch.
    rendered = dreamer.render(
        [pano for _, _, pano in decoded], engine.views, [item.yaw_offset for _, item, _ in decoded], antialias=engine.config.antialias
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
                    labels=labels[j], nsfw=nsfw[j], trajectory=trajectories[j] if trajectories else None,
                )
            )
        done[k] = DreamResult(id=item.id, dreams=dreams, meta=dict(item.meta))
    return [done[k] if k in done else _failed(item, failed[k]) for k, item in enumerate(group)]


def _scaled(progress: Progress, items: int) -> Progress:
    """A diffusion call's progress (a fraction of the call) counted in the ``items`` it works on."""
    return lambda fraction: progress(items * fraction)


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


def _decode(item: Panorama, max_pixels: int, min_width: int) -> np.ndarray:
    """A 2:1 uint8 panorama, decoded once for both CLIP and SD, at the width the SD views need."""
    if not isinstance(item, Panorama):
        raise TypeError(f"expected a Panorama, got {type(item).__name__}")
    if not isinstance(item.id, str) or not item.id:
        raise ValueError(f"panorama id must be a non-empty string, got {item.id!r}")
    if not math.isfinite(item.yaw_offset):
        raise ValueError(f"yaw_offset must be finite, got {item.yaw_offset}")
    data = item.data.detach().cpu().numpy() if isinstance(item.data, torch.Tensor) else item.data
    pano = decode_image(data, name=item.id, max_pixels=max_pixels, min_width=min_width)
    check_equirectangular(item.id, pano.shape)
    return pano


def _error_text(item, exc: Exception) -> str:
    return str(exc) if isinstance(exc, DecodeError) else f"{getattr(item, 'id', item)}: {exc}"


def _meta(item) -> dict:
    meta = getattr(item, "meta", None)
    return dict(meta) if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------------
# CLIP on images and prompts.


def clip_embed(engine: Engine, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float images in [0, 1] -> (B, D) unit CLIP embeddings, float32 on the CPU.

    Resized to CLIP's input with antialiasing and normalised with the model's own mean and std.
    """
    clip = engine.clip
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    out = []
    for chunk in images.split(engine.config.batch_size):
        x = chunk.to(clip.device, torch.float32)
        if tuple(x.shape[-2:]) != tuple(clip.image_size):
            x = F.interpolate(x, size=clip.image_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = (x - mean.to(x.device)) / std.to(x.device)
        out.append(clip.encode_images(x.to(clip.dtype)).float().cpu())
    return F.normalize(torch.cat(out), dim=1)


def text_embed(engine: Engine, texts: list[str]) -> torch.Tensor:
    """(T, D) unit CLIP text embeddings, each distinct text encoded once."""
    unique = list(dict.fromkeys(texts))
    table = dict(zip(unique, F.normalize(engine.embed_text(unique).float(), dim=1), strict=True))
    return torch.stack([table[t] for t in texts])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of unit embeddings (``b`` may be one row), kept in [-1, 1] against rounding."""
    return (a * b).sum(-1).clamp(-1, 1)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------------------------------
# 5. Latent walks: keyframes joined by slerp of the start noise and lerp of the prompt embeddings.


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str
    seed: int


@dataclass
class WalkParams:
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str = ""
    batch_size: int = 8
    fps: int = 12

    def check(self) -> None:
        check_steps(self.steps)
        check_guidance(self.guidance)
        check_steps(self.batch_size, "batch_size")
        check_steps(self.fps, "fps")


@dataclass
class WalkResult:
    keyframes: list[Keyframe]
    frames: np.ndarray  # (F, S, S, 3) uint8, F = last keyframe's frame + 1
    positions: list[tuple[int, float]]  # per frame: (index of the keyframe it leaves, t in [0, 1))
    params: WalkParams


def check_keyframes(keyframes: Sequence[Keyframe]) -> list[Keyframe]:
    """At least two keyframes, the first at frame 0, frames strictly increasing, each with a prompt and a seed."""
    keyframes = list(keyframes)
    if len(keyframes) < 2:
        raise ValueError(f"a walk needs at least two keyframes, got {len(keyframes)}")
    for k, key in enumerate(keyframes):
        where = f"keyframe {k}"
        if isinstance(key.frame, bool) or not isinstance(key.frame, int) or key.frame < 0:
            raise ValueError(f"{where}: frame must be an integer >= 0, got {key.frame!r}")
        if not isinstance(key.prompt, str):
            raise ValueError(f"{where}: prompt must be a string, got {key.prompt!r}")
        try:
            _check_seed(key.seed)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if k and key.frame <= keyframes[k - 1].frame:
            raise ValueError(f"{where}: frames must increase, but frame {key.frame} follows {keyframes[k - 1].frame}")
    if keyframes[0].frame != 0:
        raise ValueError(f"the first keyframe must be at frame 0, not {keyframes[0].frame}")
    return keyframes


def load_keyframes(path: str | os.PathLike) -> tuple[list[Keyframe], dict]:
    """Read a walk file (YAML or JSON): ``keyframes: [{frame, prompt, seed}, ...]`` plus optional settings
    (``steps``, ``guidance``, ``negative_prompt``, ``fps``, ``batch_size``). Returns (keyframes, settings)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the keyframes file ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keyframes"), list):
        raise ValueError(f"{path}: expected a mapping with a 'keyframes' list of {{frame, prompt, seed}}")
    settings = {k: v for k, v in data.items() if k != "keyframes"}
    unknown = sorted(set(settings) - {f for f in WalkParams.__dataclass_fields__})
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(WalkParams.__dataclass_fields__)}")
    keyframes = []
    for k, entry in enumerate(data["keyframes"]):
        if not isinstance(entry, dict) or set(entry) != {"frame", "prompt", "seed"}:
            raise ValueError(f"{path}: keyframe {k} must have exactly frame, prompt and seed, got {entry!r}")
        keyframes.append(Keyframe(entry["frame"], entry["prompt"], entry["seed"]))
    try:
        return check_keyframes(keyframes), settings
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two noise tensors, which keeps a Gaussian sample's norm (lerp would shrink
    it, and the model would see too little noise); nearly parallel inputs fall back to lerp."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    if cos.abs() > 0.9995:
        return torch.lerp(a, b, t)
    theta = torch.arccos(cos.clamp(-1, 1))
    out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / torch.sin(theta)
    return out.view_as(a).to(a.dtype)


def walk(dreamer: Dreamer, keyframes: Sequence[Keyframe], params: WalkParams, progress: Progress | None = None) -> WalkResult:
    """Render every frame from 0 to the last keyframe's; frames between keyframes interpolate both ends.

    ``progress``, if given, is called with the number of frames done, in fractions as denoising steps finish.
    """
    params.check()
    keyframes = check_keyframes(keyframes)
    noise = dreamer.noise([k.seed for k in keyframes])  # (K, C, h, w), one generator per keyframe
    embeds = dreamer.encode_prompt([k.prompt for k in keyframes], params.negative_prompt)  # each (K, ...)

    positions = []
    for f in range(keyframes[-1].frame + 1):
        k = max(i for i, key in enumerate(keyframes) if key.frame <= f)
        k = min(k, len(keyframes) - 2)  # the last frame is the end (t = 1) of the last segment
        t = (f - keyframes[k].frame) / (keyframes[k + 1].frame - keyframes[k].frame)
        positions.append((k, t))

    frames = []
    for start in range(0, len(positions), params.batch_size):
        batch = positions[start : start + params.batch_size]
        latents = torch.stack([slerp(noise[k], noise[k + 1], t) for k, t in batch])
        batch_embeds = {
            name: torch.stack([torch.lerp(e[k].float(), e[k + 1].float(), t).to(e.dtype) for k, t in batch])
            for name, e in embeds.items()
        }
        out = dreamer.txt2img(batch_embeds, latents, steps=params.steps, guidance=params.guidance,
                              progress=_scaled(progress or _no_progress, len(batch)))
        frames.extend(to_uint8(image) for image in out.images)
    return WalkResult(keyframes=keyframes, frames=np.stack(frames), positions=positions, params=params)


# ---------------------------------------------------------------------------------------------------
# 6. Feedback loop: img2img on its own output, K times.


@dataclass
class LoopParams:
    iterations: int = 100
    strength: float = 0.3
    steps: int = 30
    guidance: float = 7.5
    prompt: str = ""  # "" is pure reflection: the model's unconditioned idea of the image
    negative_prompt: str = ""
    seed: int = 0  # iteration i (1-based) uses seed + i - 1
    batch_size: int = 8

    def check(self) -> None:
        check_steps(self.iterations, "iterations")
        img2img_steps(check_steps(self.steps), check_strength(self.strength))
        check_guidance(self.guidance)
        _check_seed(self.seed)
        _check_seed(self.seed + self.iterations - 1)
        check_steps(self.batch_size, "batch_size")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")


@dataclass
class LoopResult:
    id: str
    frames: np.ndarray  # (K + 1, S, S, 3) uint8: the original, then each iteration's output
    drift: list[float]  # K + 1 values: 1 - cos(original, frame i); drift[0] is the original against itself
    step_drift: list[float]  # K + 1 values: 1 - cos(frame i - 1, frame i); step_drift[0] = 0
    prompt_cosine: list[float]  # K + 1 values: cos(frame i, prompt)
    seeds: list[int]  # K seeds, one per iteration


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an (H, W, 3) uint8 image to a square and resize it to ``size`` (Lanczos)."""
    from PIL import Image, ImageOps

    return np.asarray(ImageOps.fit(Image.fromarray(image), (size, size), Image.Resampling.LANCZOS))


def loop(engine: Engine, dreamer: Dreamer, images: Sequence[tuple[str, np.ndarray]], params: LoopParams,
         progress: Progress | None = None) -> list[LoopResult]:
    """Feed each (id, uint8 image) back through img2img ``iterations`` times, batched across images.

    Each iteration's input is the previous output rounded to uint8, exactly the frame that is saved, so
    any saved frame reproduces the rest of the loop. ``progress``, if given, is called with the number
    of iterations done (of one batch of ``batch_size`` images), in fractions as denoising steps finish.
    """
    params.check()
    results = []
    prompt_emb = text_embed(engine, [params.prompt])[0]
    for start in range(0, len(images), params.batch_size):
        chunk = images[start : start + params.batch_size]
        current = np.stack([fit_square(image, dreamer.size) for _, image in chunk])  # (B, S, S, 3)
        frames = [current]
        embeddings = [clip_embed(engine, from_uint8(current))]
        seeds = [params.seed + i for i in range(params.iterations)]
        for seed in seeds:
            out = dreamer.img2img(
                from_uint8(current) * 2 - 1,
                prompts=[params.prompt] * len(chunk),
                negative_prompt=params.negative_prompt,
                strength=params.strength,
                steps=params.steps,
                guidance=params.guidance,
                seeds=[seed] * len(chunk),
                progress=progress,
            )
            current = np.stack([to_uint8(image) for image in out.images])
            frames.append(current)
            embeddings.append(clip_embed(engine, from_uint8(current)))
        emb = torch.stack(embeddings, dim=1)  # (B, K + 1, D)
        for b, (image_id, _) in enumerate(chunk):
            results.append(
                LoopResult(
                    id=image_id,
                    frames=np.stack([f[b] for f in frames]),
                    drift=(1 - cosine(emb[b], emb[b, 0])).tolist(),
                    step_drift=[0.0, *(1 - cosine(emb[b, 1:], emb[b, :-1])).tolist()],
                    prompt_cosine=cosine(emb[b], prompt_emb).tolist(),
                    seeds=seeds,
                )
            )
    return results


# ---------------------------------------------------------------------------------------------------
# Saving: images, video, contact sheets, and the record of every run.


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 12) -> Path:
    """(F, H, W, 3) uint8 frames -> an H.264 MP4 (MPEG-4 part 2 where libx264 is missing), via PyAV."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"MP4 (yuv420p) needs even frame sizes, got {width}x{height}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "16"}  # near-lossless: the frames are the data
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def count_mp4_frames(path: str | os.PathLike) -> int:
    """Frames decoded from a video file (not the container's claimed count)."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def contact_sheet(frames: np.ndarray, columns: int | None = None, thumb: int = 128) -> np.ndarray:
    """Frames in a grid, left to right then top to bottom, each resized to ``thumb`` pixels wide."""
    from PIL import Image

    count = len(frames)
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height = round(thumb * frames.shape[1] / frames.shape[2])
    sheet = Image.new("RGB", (columns * thumb, rows * height), (255, 255, 255))
    for k, frame in enumerate(frames):
        small = Image.fromarray(frame).resize((thumb, height), Image.Resampling.LANCZOS)
        sheet.paste(small, ((k % columns) * thumb, (k // columns) * height))
    return np.asarray(sheet)


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """The run's record as JSON, written atomically (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _save_png(image: np.ndarray, path: Path) -> str:
    from PIL import Image

    Image.fromarray(image).save(path)
    return path.name


def _header(operation: str, dreamer: Dreamer, engine: Engine | None, params, seconds: float) -> dict:
    header = {"operation": operation, "mimetic_version": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    header["parameters"] = asdict(params)
    header["diffusion"] = dreamer.info()
    if engine is not None:
        header["clip"] = {"model": engine.clip.name, "weights": engine.clip.weights, "attention": engine.clip.attention}
    header["seconds"] = seconds
    return header


def save_dreams(results: Sequence[DreamResult], out_dir: str | os.PathLike, *, engine: Engine, dreamer: Dreamer,
                params: DreamParams, seconds: float = 0.0) -> Path:
    """Write each view and dream as PNGs (and trajectory frames), and ``out_dir/dreams.json``; return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocabularies = label_vocabularies(params.from_labels)
    record = _header("dream", dreamer, engine, params, seconds)
    record["template"] = params.resolved_template(vocabularies)
    record["placeholders"] = {key: {"vocabulary": v.name, "template": v.template, "labels_sha256": v.labels_hash}
                              for key, v in vocabularies.items()}
    record["panoramas"] = []
    images = 0
    for stem, result in zip(file_stems([r.id for r in results]), results, strict=True):
        entry = {"id": result.id, "meta": result.meta, "error": result.error, "dreams": []}
        for d in result.dreams:
            name = f"{stem}_{d.index}_y{d.view.yaw:g}_p{d.view.pitch:g}"
            files = {"view": _save_png(d.source, out / f"{name}_view.png"), "dream": _save_png(d.image, out / f"{name}_dream.png")}
            row = {"view": d.index, **asdict(d.view), "prompt": d.prompt, "seed": d.seed, "labels": d.labels,
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


def save_walk(result: WalkResult, path: str | os.PathLike, *, dreamer: Dreamer, frames_dir: str | os.PathLike | None = None,
              seconds: float = 0.0) -> dict[str, Path]:
    """``path`` (.mp4), ``<stem>-contact.png`` and ``<stem>.json`` beside it, and each frame in ``frames_dir`` if given."""
    from PIL import Image

    video = write_mp4(result.frames, path, result.params.fps)
    sheet = video.with_name(f"{video.stem}-contact.png")
    Image.fromarray(contact_sheet(result.frames)).save(sheet)
    record = _header("walk", dreamer, None, result.params, seconds)
    record["keyframes"] = [asdict(k) for k in result.keyframes]
    record["frames"] = [{"frame": f, "from_keyframe": k, "t": t} for f, (k, t) in enumerate(result.positions)]
    record["files"] = {"video": video.name, "contact_sheet": sheet.name}
    if frames_dir is not None:
        folder = Path(frames_dir)
        folder.mkdir(parents=True, exist_ok=True)
        record["files"]["frames"] = [_save_png(f, folder / f"frame_{i:05d}.png") for i, f in enumerate(result.frames)]
    record["images_per_s"] = len(result.frames) / seconds if seconds > 0 else None
    written = {"video": video, "contact_sheet": sheet, "record": write_record(record, video.with_suffix(".json"))}
    return written


def save_loop(results: Sequence[LoopResult], out_dir: str | os.PathLike, *, engine: Engine, dreamer: Dreamer,
              params: LoopParams, fps: int = 12, sources: Sequence[str] | None = None, failed: Sequence[dict] = (),
              seconds: float = 0.0) -> Path:
    """Per image: ``<stem>/frame_NNNN.png``, ``<stem>.mp4``, ``<stem>-contact.png``, ``<stem>-drift.csv``; then ``loop.json``."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _header("loop", dreamer, engine, params, seconds)
    record["fps"], record["images"], record["failed"] = fps, [], list(failed)
    for k, (stem, result) in enumerate(zip(file_stems([r.id for r in results]), results, strict=True)):
        folder = out / stem
        folder.mkdir(exist_ok=True)
        for i, frame in enumerate(result.frames):
            _save_png(frame, folder / f"frame_{i:04d}.png")
        video = write_mp4(result.frames, out / f"{stem}.mp4", fps)
        Image.fromarray(contact_sheet(result.frames)).save(out / f"{stem}-contact.png")
        # Numbers stay numbers (rounded as before); the prompt is text, escaped if a spreadsheet would run it.
        rows = [
            {"iteration": i, "seed": result.seeds[i - 1] if i else None, "prompt": params.prompt if i else None,
             "drift": round(result.drift[i], 6), "step_drift": round(result.step_drift[i], 6),
             "prompt_cosine": round(result.prompt_cosine[i], 6)}
            for i in range(len(result.drift))
        ]
        write_csv(out / f"{stem}-drift.csv", rows, DRIFT_COLUMNS)
        record["images"].append({
            "id": result.id, "source": sources[k] if sources else None, "seeds": result.seeds, "drift": result.drift,
            "step_drift": result.step_drift, "prompt_cosine": result.prompt_cosine,
            "files": {"frames": f"{stem}/frame_NNNN.png", "video": video.name, "contact_sheet": f"{stem}-contact.png",
                      "drift": f"{stem}-drift.csv"},
        })
    iterations = sum(len(r.seeds) for r in results)
    record["images_per_s"] = iterations / seconds if seconds > 0 else None
    return write_record(record, out / "loop.json")
