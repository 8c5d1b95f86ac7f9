"""Machine dreams: how Stable Diffusion recreates the places CLIP is shown, on the engine's own views.

    from engine import Engine, EngineConfig, Panorama
    from engine.dream.dream import dream, save_dreams
    from engine.dream.params import DreamParams
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

The operations live in ``params`` (their parameters and prompt templates), ``dream``, ``walk`` and ``loop``;
this module holds what they share: CLIP on images and prompts, and the writing of images, videos and records.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import __version__
from engine.models.diffusion import Dreamer
from engine.pipeline import Engine

# Called with units of work done (views, frames or iterations), in fractions as denoising steps finish.
Progress = Callable[[float], None]


def _no_progress(_done: float) -> None:
    pass


def _scaled(progress: Progress, items: int) -> Progress:
    """A diffusion call's progress (a fraction of the call) counted in the ``items`` it works on."""
    return lambda fraction: progress(items * fraction)


# ---------------------------------------------------------------------------------------------------
# CLIP on images and prompts.


def clip_embed(engine: Engine, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float images in [0, 1] -> (B, D) unit CLIP embeddings, float32 on the CPU
    (``ClipModel.embed_pixels``, in the Engine's batches)."""
    return engine.clip.embed_pixels(images, batch_size=engine.config.batch_size)


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
