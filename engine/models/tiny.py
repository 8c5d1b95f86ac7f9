"""A tiny, real CLIP for offline tests and demonstrations: `make_tiny_clip(DIR)` writes ``DIR/clip``.

It is open_clip's own ``CLIP`` class (ViT image tower, causal text tower, OpenAI BPE tokenizer) with
tiny widths and a fixed random initialisation, saved in open_clip's ``local-dir:`` layout:

    DIR/clip/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}}
    DIR/clip/open_clip_model.safetensors  the state dict

so it loads through exactly the code that real weights use: ``load_clip("local-dir:DIR/clip")``.
Its embeddings are random projections, meaningless as readings, but deterministic and correctly shaped.
The text tower keeps CLIP's ``vocab_size=49408`` and ``context_length=77`` so open_clip's bundled
``SimpleTokenizer`` (its BPE vocabulary ships inside the package) is valid, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

TINY_SEED = 20240917

# open_clip model_cfg: the same keys as open_clip/model_configs/ViT-B-32.json, with tiny widths.
TINY_MODEL_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "layers": 2,
        "width": 64,
        "head_width": 32,  # heads = width // head_width = 2 (even: nn.MultiheadAttention's fast path)
        "patch_size": 16,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}

# OpenAI CLIP's normalisation, as open_clip's own ViT-B-32 preprocess cfg has it.
TINY_PREPROCESS_CFG: dict = {
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"  # first in open_clip's preferred checkpoint order


def make_tiny_clip(out_dir: str | Path, *, seed: int = TINY_SEED) -> Path:
    """Write a tiny, randomly initialised (fixed ``seed``) CLIP to ``out_dir/clip``; return that directory.

    Load it with ``engine.models.load_clip(f"local-dir:{path}")``. Same seed, same torch: same weights.
    """
    clip_dir = Path(out_dir) / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = _build()
    config = {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (clip_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_checkpoint(model, clip_dir / WEIGHTS_NAME)
    return clip_dir


def _build() -> torch.nn.Module:
    """open_clip's CLIP from TINY_MODEL_CFG, fp32, on CPU, initialised from the current torch RNG."""
    import copy

    from open_clip.model import CLIP

    return CLIP(**copy.deepcopy(TINY_MODEL_CFG)).eval()


def save_checkpoint(model, path: str | Path) -> Path:
    """Save a model's state dict (a ``ClipModel`` or an ``nn.Module``) as ``.safetensors``; return the path.

    Non-persistent buffers (the text tower's causal mask) are not part of the state dict and are not saved.
    """
    from safetensors.torch import save_file

    module = getattr(model, "model", model)  # ClipModel -> its open_clip module
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
