"""5. Latent walks: keyframes joined by slerp of the start noise and lerp of the prompt embeddings; and ``save_walk``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.dream.core import (
    Progress,
    _header,
    _no_progress,
    _save_png,
    _scaled,
    contact_sheet,
    to_uint8,
    write_mp4,
    write_record,
)
from engine.dream.params import WalkParams, _check_seed
from engine.models.diffusion import Dreamer

# ---------------------------------------------------------------------------------------------------
# 5. Latent walks: keyframes joined by slerp of the start noise and lerp of the prompt embeddings.


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str
    seed: int


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
# Saving: images, video, contact sheets, and the record of every run.


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
