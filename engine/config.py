"""Typed settings for the Engine: one place for every default. Each field is also a CLI flag.

Each field's ``help`` (its metadata) is the description its ``--flag`` shows in ``--help``; the flags
are generated from these fields (``engine.cli.add_engine_arguments``), so a new field gets a flag and
must say what it does. An int flag must be positive unless its metadata gives ``"minimum": 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_VOCABULARIES = ("styles", "periods", "urban")
DEFAULT_MAX_PIXELS = 2**28  # 268 MP: a 23k x 11.5k panorama, 805 MB as uint8 RGB (engine.decode's default too)
DEFAULT_SHARD_SIZE = 1000  # inputs per ingest shard (engine.ingest.job), the unit of commit and resume
DEFAULT_CAPTION_BEAMS = 3  # BLIP's own captioning evaluation uses beam search of 3 (engine.models.caption)
DEFAULT_CAPTION_MAX_TOKENS = 30
# Panoramas the report's map and UMAP draw (a seeded sample above it; its statistics use all): what
# keeps the page interactive (WebGL above 2,000); bench/report.py measures its open time.
DEFAULT_REPORT_MAX_POINTS = 20_000


@dataclass
class EngineConfig:
    """What the Engine loads and how it runs. ``--flag-name`` on the CLI for every ``field_name``."""

    # A preset of engine.views by name, or (from Python) a list of ViewSpec / dicts.
    views: str | list = field(default="ring8", metadata={"help": "view-set preset"})
    clip_model: str = field(default="ViT-B-32", metadata={"help": "an open_clip architecture name, or local-dir:PATH (an open_clip folder with its weights)"})
    clip_weights: str | None = field(default=None, metadata={"help": "a local .safetensors/.bin checkpoint, or an open_clip pretrained tag in the local cache"})
    random_weights: bool = field(default=False, metadata={"help": "build the architecture untrained, for benchmarks and offline demos: readings are meaningless"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (auto: CUDA when there is one)"})
    precision: str = field(default="auto", metadata={"help": "the models' dtype: auto (fp16 on CUDA, bf16 on a CPU with native bf16, AMX or AVX512-BF16, else fp32) | fp32 | bf16 | fp16", "choices": ("auto", "fp32", "bf16", "fp16")})
    attention: str = field(default="auto", metadata={"help": "attention backend: auto | sdpa | xformers"})
    batch_size: int = field(default=256, metadata={"help": "views per model call"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the image tower (slow to start, faster on long runs)"})
    vocabularies: tuple[str, ...] = field(default=DEFAULT_VOCABULARIES, metadata={"help": "comma-separated vocabularies for zero-shot readings: bundled names or files"})
    top_k: int = field(default=5, metadata={"help": "labels kept per vocabulary, per view and pooled"})
    antialias: bool = field(default=True, metadata={"help": "the reprojection kernel's footprint (tent) filter; without it views are sampled plainly bilinearly"})
    decode_workers: int = field(default=4, metadata={"help": "threads decoding images ahead of the model"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "largest image accepted, in pixels (decompression-bomb guard)"})
    max_decode_mib: int = field(default=2048, metadata={"help": "memory for images being decoded or waiting for the model, over every input at once, in MiB"})
    seed: int = field(default=0, metadata={"help": "seed of the untrained weights of --random-weights, so a demo or bench run is reproducible", "minimum": 0})


@dataclass(frozen=True)
class CaptionSettings:
    """A captioner beside the Engine (``mimetic ingest --captions``): its folder, decoding, and the flavour
    vocabularies whose top labels follow each caption in the interrogator prompt."""

    model: str
    beams: int = DEFAULT_CAPTION_BEAMS
    max_tokens: int = DEFAULT_CAPTION_MAX_TOKENS
    flavours: tuple[str, ...] = ("mediums", "movements", "styles")
