"""Typed settings for the Engine: one place for every default. Each field is also a CLI flag."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_VOCABULARIES = ("styles", "periods", "urban")


@dataclass
class EngineConfig:
    """What the Engine loads and how it runs. ``--flag-name`` on the CLI for every ``field_name``."""

    views: str | list = "ring8"  # a preset of engine.views, or a list of ViewSpec / dicts
    clip_model: str = "ViT-B-32"  # an open_clip architecture name, or "local-dir:PATH"
    clip_weights: str | None = None  # a local .safetensors/.bin checkpoint, or an open_clip pretrained tag
    random_weights: bool = False  # build the architecture untrained (benchmarks, offline demos): loud
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attention: str = "auto"  # auto | sdpa | xformers
    batch_size: int = 256  # views per model call
    compile: bool = False  # torch.compile the image tower
    vocabularies: tuple[str, ...] = DEFAULT_VOCABULARIES  # bundled names or paths to vocabulary files
    top_k: int = 5  # labels kept per vocabulary, per view and pooled
    antialias: bool = True  # footprint filter in the reprojection kernel
    decode_workers: int = 4  # threads decoding images ahead of the model
    max_pixels: int = 2**28  # decompression-bomb guard, per image
    max_decode_mib: int = 2048  # memory for images being decoded or waiting for the model, over every input at once
    seed: int = 0  # seeds the untrained weights of --random-weights, so a demo or bench run is reproducible
    sd_model: str | None = None  # a local diffusers folder (dream, walk, loop)
    sd_batch_size: int = 8  # views per Stable Diffusion call
