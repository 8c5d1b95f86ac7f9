"""6. Feedback loop: img2img on its own output, K times, with CLIP drift from the original; and ``save_loop``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.dream.core import (
    Progress,
    _header,
    _save_png,
    clip_embed,
    contact_sheet,
    cosine,
    from_uint8,
    text_embed,
    to_uint8,
    write_mp4,
    write_record,
)
from engine.dream.params import LoopParams
from engine.models.diffusion import Dreamer
from engine.pipeline import Engine
from engine.results import file_stems, write_csv

DRIFT_COLUMNS = ("iteration", "seed", "prompt", "drift", "step_drift", "prompt_cosine")  # a loop's <stem>-drift.csv


# ---------------------------------------------------------------------------------------------------
# 6. Feedback loop: img2img on its own output, K times.


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


def save_loop(results: Sequence[LoopResult], out_dir: str | os.PathLike, *, engine: Engine, dreamer: Dreamer,
              params: LoopParams, sources: Sequence[str] | None = None, failed: Sequence[dict] = (),
              seconds: float = 0.0) -> Path:
    """Per image: ``<stem>/frame_NNNN.png``, ``<stem>.mp4``, ``<stem>-contact.png``, ``<stem>-drift.csv``; then ``loop.json``."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _header("loop", dreamer, engine, params, seconds)
    record["fps"], record["images"], record["failed"] = params.fps, [], list(failed)
    for k, (stem, result) in enumerate(zip(file_stems([r.id for r in results]), results, strict=True)):
        folder = out / stem
        folder.mkdir(exist_ok=True)
        for i, frame in enumerate(result.frames):
            _save_png(frame, folder / f"frame_{i:04d}.png")
        video = write_mp4(result.frames, out / f"{stem}.mp4", params.fps)
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
