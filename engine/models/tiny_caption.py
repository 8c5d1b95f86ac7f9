"""A tiny, real BLIP captioner for offline tests and demonstrations: `make_tiny_caption(DIR)` writes ``DIR/caption``.

It is transformers' own ``BlipForConditionalGeneration`` (the architecture of
Salesforce/blip-image-captioning-base and -large: a ViT image encoder and a BERT-style causal text
decoder with cross-attention) with tiny widths and a fixed random initialisation, saved with
``save_pretrained`` beside a ``BlipProcessor``:

    DIR/caption/config.json  model.safetensors  generation_config.json
    DIR/caption/preprocessor_config.json        image size, mean and std (BLIP's: OpenAI CLIP's)
    DIR/caption/tokenizer.json  vocab.txt  ...  a BERT WordPiece tokenizer with BLIP's [DEC] token

so it loads through exactly the code that real weights use: ``Captioner("DIR/caption")``. Its
captions are random words, meaningless as descriptions, but deterministic and correctly formed.

The tokenizer is built here without a download: the special tokens BLIP's processor has ([PAD],
[UNK], [CLS], [SEP], [MASK] and the decoder's [DEC]) and one WordPiece entry per word of the street
vocabulary that the tiny Stable Diffusion also spells (so a caption is a prompt the tiny SD reads).
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from engine.models.tiny_sd import WORDS

TINY_SEED = 20240919
TINY_SIZE = 64  # the image encoder's input size (px): 4 x 4 patches of 16

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")  # ids 0..5, in this order

# OpenAI CLIP's normalisation, which BLIP's processors use.
MEAN, STD = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

VISION_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": TINY_SIZE,
    "patch_size": 16,
    "initializer_range": 0.1,  # see INIT_RANGE
}

TEXT_CONFIG = {
    "hidden_size": 32,
    "encoder_hidden_size": 32,  # the vision width: the decoder cross-attends to the image tokens
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}

# BLIP's own 0.02 makes an untrained decoder write the same words for every image; at 0.1 the
# cross-attention moves the logits enough that different views get different (random) captions,
# which the tests need in order to see that each caption belongs to its own view.
INIT_RANGE = 0.1


def make_tiny_caption(out_dir: str | Path, *, seed: int = TINY_SEED) -> Path:
    """Write a tiny, randomly initialised (fixed ``seed``) BLIP captioner to ``out_dir/caption``; return that folder.

    Load it with ``engine.models.caption.Captioner(path)``. Same seed, same torch: same weights.
    """
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(out_dir) / "caption"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    text = {
        **TEXT_CONFIG,
        "vocab_size": len(tokenizer),
        "pad_token_id": ids["[PAD]"],
        "bos_token_id": ids["[DEC]"],  # BLIP starts every caption with [DEC] ...
        "sep_token_id": ids["[SEP]"],  # ... and ends it at [SEP]
        "eos_token_id": ids["[SEP]"],
    }
    config = BlipConfig(text_config=text, vision_config=VISION_CONFIG, projection_dim=32, initializer_range=INIT_RANGE)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(
        size={"height": TINY_SIZE, "width": TINY_SIZE}, image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    from engine.models.diffusion import quiet_hf

    with quiet_hf():
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
    return folder


def write_tokenizer(folder: Path):
    """Write a WordPiece ``vocab.txt`` (BLIP's special tokens, then ``WORDS``) and load a BertTokenizerFast from it."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys([*SPECIAL, *WORDS, ",", "."]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(  # transformers >= 5 takes the vocabulary itself, not a vocab_file path
        vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]",
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )
