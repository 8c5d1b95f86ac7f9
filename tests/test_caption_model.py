"""The captioner (engine.models.caption) on the tiny BLIP, loaded through the real transformers loaders."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from engine.models.caption import Captioner, CaptionModelError, check_generation
from engine.models.tiny_caption import MEAN, STD, TINY_SIZE, make_tiny_caption
from engine.views import ring8
from kernels import ViewSpec, reproject


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory):
    return make_tiny_caption(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def captioner(caption_dir):
    return Captioner(caption_dir)


@pytest.fixture(scope="module")
def small_louvre(louvre):
    return np.ascontiguousarray(louvre[::4, ::4])  # 512 x 1024: what DCT-scaled decoding gives for small views


def test_tiny_blip_loads_as_the_real_architecture_with_its_processor_settings(captioner, caption_dir):
    info = captioner.info()
    assert info["architecture"] == "BlipForConditionalGeneration"
    assert info["image_size"] == [TINY_SIZE, TINY_SIZE]
    saved = json.loads((caption_dir / "config.json").read_text())
    assert saved["model_type"] == "blip" and saved["architectures"] == ["BlipForConditionalGeneration"]
    # The normalisation comes from the processor's file, not from a constant in the code.
    assert info["mean"] == pytest.approx(MEAN) and info["std"] == pytest.approx(STD)
    assert info["dtype"] == "float32" and info["device"] == "cpu"


def test_views_are_cut_by_the_kernel_at_the_model_size_and_normalised_with_its_mean_and_std(captioner, small_louvre):
    views = ring8(224)
    pixels = captioner.render([small_louvre], views)
    assert pixels.shape == (1, 8, 3, TINY_SIZE, TINY_SIZE) and pixels.dtype == torch.float32
    # Undo the processor's normalisation: the uint8 render of the same views at the same size, within a level.
    plain = reproject([torch.from_numpy(small_louvre)], [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, TINY_SIZE, TINY_SIZE) for v in views],
                      out_dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, 1, 3, 1, 1), torch.tensor(STD).view(1, 1, 3, 1, 1)
    back = (pixels * std + mean) * 255
    assert (back - plain.float()).abs().max() <= 1.0


def test_captions_are_deterministic_per_view_and_do_not_depend_on_the_batch(caption_dir, captioner, small_louvre):
    pixels = captioner.render([small_louvre], ring8(224))[0]
    batched = captioner.caption(pixels)
    assert len(batched) == 8 and all(isinstance(c, str) for c in batched)
    assert len(set(batched)) >= 3, batched  # each view gets its own text: the model reads the pixels
    alone = [captioner.caption(pixels[i : i + 1])[0] for i in range(8)]
    assert alone == batched
    again = Captioner(caption_dir).caption(pixels)  # a fresh load from the same folder
    assert again == batched


def test_beams_and_length_change_the_decoding(caption_dir, small_louvre):
    short = Captioner(caption_dir, beams=1, max_tokens=2)
    pixels = short.render([small_louvre], ring8(224))[0]
    tokens = [len(short.tokenizer(c, add_special_tokens=False).input_ids) for c in short.caption(pixels)]
    assert max(tokens) <= 2 and max(tokens) >= 1
    greedy = Captioner(caption_dir, beams=1).caption(pixels)
    beam = Captioner(caption_dir, beams=4).caption(pixels)
    assert greedy != beam  # beam search found other captions for some views


def test_plain_images_are_resized_once_and_captioned(captioner, small_louvre):
    images = [small_louvre[:300, :400], small_louvre[100:164, 500:564]]
    pixels = captioner.pixels_of(images)
    assert pixels.shape == (2, 3, TINY_SIZE, TINY_SIZE)
    # A 64x64 crop is already the model's size: its pixels are the crop itself, normalised.
    crop = torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255
    expected = (crop - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(pixels[1], expected, atol=1e-5)
    assert len(captioner.caption(pixels)) == 2


def test_a_model_that_stops_at_once_gives_an_empty_caption_not_an_error(caption_dir, small_louvre):
    captioner = Captioner(caption_dir, beams=1)
    head = captioner.model.text_decoder.cls.predictions.decoder
    sep = captioner.model.config.text_config.sep_token_id
    with torch.no_grad():
        head.bias[sep] += 1e4  # [SEP] first, always
    assert captioner.caption(captioner.render([small_louvre], ring8(224))[0][:2]) == ["", ""]


def test_the_wrong_pixel_shape_is_one_clear_error(captioner):
    with pytest.raises(ValueError, match=r"expected \(B, 3, 64, 64\) pixels, got \(2, 3, 32, 32\)"):
        captioner.caption(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize(("beams", "tokens", "message"), [(0, 30, "beams"), (17, 30, "beams"), (3, 0, "length"), (True, 30, "beams")])
def test_generation_settings_are_checked_before_loading(beams, tokens, message):
    with pytest.raises(ValueError, match=message):
        check_generation(beams, tokens)


def test_a_missing_or_incomplete_folder_says_what_to_pass(caption_dir, tmp_path):
    with pytest.raises(CaptionModelError, match=r"caption model not found: .*make-tiny DIR"):
        Captioner(tmp_path / "nope")
    broken = tmp_path / "no-processor"
    shutil.copytree(caption_dir, broken)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(CaptionModelError, match=r"has no preprocessor_config\.json"):
        Captioner(broken)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(caption_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CaptionModelError, match=re.escape(f"cannot load a 'blip' model as a captioner from {no_weights}")):
        Captioner(no_weights)


def test_an_unsupported_architecture_is_a_clear_error(caption_dir, tmp_path):
    other = tmp_path / "bert"
    shutil.copytree(caption_dir, other)
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CaptionModelError, match="cannot load a 'bert' model as a captioner"):
        Captioner(other)
