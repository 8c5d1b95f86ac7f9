"""A tiny, real Stable Diffusion for offline tests and demonstrations: `make_tiny_sd(DIR)` writes ``DIR/sd``.

It is diffusers' own ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL, a transformers
CLIPTextModel and CLIPTokenizer, a DDIM scheduler with SD-1.5's noise schedule) with tiny widths and a
fixed random initialisation, saved with ``save_pretrained``:

    DIR/sd/model_index.json     the pipeline class and its components
    DIR/sd/unet/  vae/  text_encoder/  tokenizer/  scheduler/

so it loads through exactly the code that real weights use: ``Dreamer("DIR/sd")``. Its images are
noise shaped by random convolutions, meaningless as pictures, but deterministic and correctly shaped.
The VAE downsamples by 8 like SD's, so latent shapes and size rules are the real ones; the native
size is 64x64 (latents 8x8).

The tokenizer is CLIP's byte-level BPE, built here without a download: its base vocabulary is the
256 byte symbols (alone and word-final), so any text tokenizes, plus BPE merges learned here from a
few dozen words of the street and architecture vocabulary, each of which becomes one token.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

TINY_SEED = 20240918
TINY_SIZE = 64  # native image size (px): sample_size 8 x the VAE's downsampling of 8

# Words the merges spell out whole (lower case: CLIP's tokenizer lowercases).
WORDS = (
    "a an the of in on and with from photo photograph painting picture street city place square building "
    "church house bridge river tree sky road architecture ancient roman greek gothic baroque renaissance "
    "modernist brutalist neoclassical victorian medieval century period stone brick glass concrete wood "
    "public quiet lively empty crowded old new night day"
).split()

UNET_CONFIG = {
    "sample_size": TINY_SIZE // 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}

VAE_CONFIG = {
    "sample_size": TINY_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 32, 32, 32),  # four blocks: a downsampling factor of 8, as in SD
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
}

TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}

# SD-1.5's noise schedule (its scheduler_config.json), on DDIM: deterministic, and its step reports
# the predicted clean image, which trajectories use.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_tiny_sd(out_dir: str | Path, *, seed: int = TINY_SEED) -> Path:
    """Write a tiny, randomly initialised (fixed ``seed``) Stable Diffusion to ``out_dir/sd``; return that folder.

    Load it with ``engine.models.diffusion.Dreamer(path)``. Same seed, same torch: same weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd_dir = Path(out_dir) / "sd"
    sd_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(sd_dir / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    from engine.models.diffusion import quiet_hf

    with quiet_hf():
        pipe.save_pretrained(sd_dir, safe_serialization=True)
    _write_bpe_files(sd_dir / "tokenizer")  # save_pretrained may write only tokenizer.json: keep both forms
    return sd_dir


def write_tokenizer(folder: Path):
    """Write CLIP BPE files (vocab.json, merges.txt) for ``WORDS`` to ``folder`` and load a CLIPTokenizer from them."""
    from transformers import CLIPTokenizer

    _write_bpe_files(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _write_bpe_files(folder: Path) -> None:
    vocab, merges = bpe_vocabulary(WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update({"model_max_length": 77, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def bpe_vocabulary(words) -> tuple[dict[str, int], list[str]]:
    """Learn BPE merges on ``words`` (each counted once) until each is one symbol; return CLIP's layout.

    The vocabulary is CLIP's: the byte symbols, the byte symbols + ``</w>``, one entry per merge, then
    BOS and EOS. Merging the most frequent adjacent pair first (ties: the pair seen first) is BPE's own
    training rule, and applying the merges in that order reproduces it, so each word in ``words`` is a
    single token and any other text falls back to shorter pieces, down to single bytes.
    """
    symbols = _byte_symbols()
    table = dict(enumerate(symbols))
    spelled = []
    for word in dict.fromkeys(words):
        pieces = [table[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        spelled.append(pieces)
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces in spelled:
            for pair in itertools.pairwise(pieces):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=counts.__getitem__)  # max keeps the first of equal counts: insertion order
        merges.append(" ".join(best))
        spelled = [_merge(pieces, best) for pieces in spelled]
    # Two merges can spell the same string ("ab c", "a bc"): one vocabulary entry serves both.
    tokens = dict.fromkeys([*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges), BOS, EOS])
    return {token: index for index, token in enumerate(tokens)}, merges


def _merge(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (``bytes_to_unicode``), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]
