"""Machinic mimesis (engine.dream.translate and `mimetic translate`) on the tiny CLIP, SD and BLIP."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, EngineConfig, Panorama
from engine.dream.translate import TranslateParams, translate, translate_inputs
from engine.models.caption import Captioner
from engine.models.diffusion import Dreamer
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_caption import make_tiny_caption
from engine.models.tiny_sd import make_tiny_sd
from kernels import ViewSpec, reproject

from .conftest import PANORAMAS
from .test_cli import mimetic


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    make_tiny_clip(folder), make_tiny_sd(folder), make_tiny_caption(folder)
    return folder


@pytest.fixture(scope="module")
def trio(models):
    return (Engine(EngineConfig(clip_model=f"local-dir:{models / 'clip'}", vocabularies=())), Dreamer(models / "sd"),
            Captioner(models / "caption"))


@pytest.fixture(scope="module")
def photos(louvre):
    return [("a", np.ascontiguousarray(louvre[600:1200, 1200:1800])), ("b", np.ascontiguousarray(louvre[900:1300, 100:500]))]


def test_each_round_captions_the_image_made_from_the_last_text(trio, photos):
    engine, dreamer, captioner = trio
    [a, b] = translate(engine, dreamer, captioner, photos, TranslateParams(rounds=3, steps=2, seed=10))
    assert [r.round for r in a.rounds] == [1, 2, 3] and [r.seed for r in a.rounds] == [None, 12, 13]  # round r: seed + r
    first = a.rounds[0]
    assert first.image_drift == 0.0 and first.text_drift == 0.0 and first.image.shape == (dreamer.size, dreamer.size, 3)
    # Round 1's text is the captioner's caption of the input; each later text is the caption of that round's image.
    assert first.text == captioner.caption(captioner.pixels_of([first.image]))[0]
    for r in a.rounds[1:]:
        assert r.text == captioner.caption(captioner.pixels_of([r.image]))[0]
    # Drift is measured against round 1, in CLIP image space and in CLIP text space.
    from engine.dream.core import clip_embed, from_uint8

    embeddings = clip_embed(engine, from_uint8(np.stack([r.image for r in a.rounds])))
    assert a.rounds[2].image_drift == pytest.approx(1 - float(embeddings[2] @ embeddings[0]), abs=1e-5)
    text = torch.nn.functional.normalize(engine.embed_text([a.rounds[0].text, a.rounds[2].text]).float(), dim=1)
    assert a.rounds[2].text_drift == pytest.approx(1 - float(text[1] @ text[0]), abs=1e-5)
    assert a.rounds[1].image_drift > 0  # the model changed the picture
    assert not np.array_equal(a.rounds[0].image, b.rounds[0].image)


def test_translation_is_deterministic_and_img2img_starts_from_the_previous_image(trio, photos):
    engine, dreamer, captioner = trio
    params = TranslateParams(rounds=2, steps=2, seed=3)
    one, two = (translate(engine, dreamer, captioner, photos[:1], params)[0] for _ in range(2))
    assert [r.text for r in one.rounds] == [r.text for r in two.rounds]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(one.rounds, two.rounds, strict=True))
    img2img = translate(engine, dreamer, captioner, photos[:1], TranslateParams(rounds=2, steps=4, seed=3, mode="img2img", strength=0.25))[0]
    # Round 2 is img2img of round 1's image with round 1's text and seed 3 + 2, exactly as a direct call makes it.
    from engine.dream.core import from_uint8, to_uint8

    direct = dreamer.img2img(from_uint8(img2img.rounds[0].image[None]) * 2 - 1, prompts=[img2img.rounds[0].text],
                             strength=0.25, steps=4, guidance=7.5, seeds=[5])
    assert np.array_equal(img2img.rounds[1].image, to_uint8(direct.images[0]))
    assert not np.array_equal(img2img.rounds[1].image, one.rounds[1].image)


@pytest.mark.parametrize(("params", "message"), [(TranslateParams(rounds=0), "rounds"), (TranslateParams(mode="loop"), "mode"),
                                                 (TranslateParams(strength=0), "strength")])
def test_bad_parameters_are_refused_before_any_work(trio, photos, params, message):
    with pytest.raises(ValueError, match=message):
        translate(*trio, photos, params)


def test_round_one_is_a_panoramas_view_from_the_engine_or_a_plain_image_whole(trio, photos, tmp_path):
    engine, dreamer, _ = trio
    Image.fromarray(photos[0][1]).save(tmp_path / "photo.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    items = [Panorama(id=name, data=path) for name, path in
             [("pano", PANORAMAS / "louvre.jpg"), ("photo", tmp_path / "photo.png"), ("broken", tmp_path / "broken.jpg")]]
    images, failed = translate_inputs(engine, items, yaw=90.0, size=dreamer.size)
    assert [image_id for image_id, _ in images] == ["pano", "photo"]
    assert [row["id"] for row in failed] == ["broken"] and "broken" in failed[0]["error"]
    # The panorama's view at yaw 90, at the model's size: the kernel's cut of the full-size panorama, up to the
    # reduced (DCT-scaled) decoding the Engine's input stage does.
    full = torch.from_numpy(np.asarray(Image.open(PANORAMAS / "louvre.jpg").convert("RGB")))
    spec = ViewSpec(90.0, 0.0, 0.0, 90.0, dreamer.size, dreamer.size)
    expected = reproject([full], [spec], out_dtype=torch.uint8, layout="NHWC")[0, 0].numpy()
    assert images[0][1].shape == expected.shape
    assert np.abs(images[0][1].astype(int) - expected).mean() < 3
    assert np.array_equal(images[1][1], photos[0][1])  # a plain image, whole
    # --plain reads even a 2:1 panorama whole.
    [(_, whole)], _ = translate_inputs(engine, items[:1], yaw=0.0, size=dreamer.size, plain=True)
    assert whole.shape[1] == 2 * whole.shape[0] > dreamer.size


def test_mimetic_translate_writes_every_file_and_keeps_going(models, tmp_path):
    pano = str(PANORAMAS / "louvre.jpg")
    missing = str(tmp_path / "missing.png")
    common = ["--rounds", "3", "--steps", "2", "--sd-model", str(models / "sd"), "--caption-model", str(models / "caption"),
              "--clip-model", f"local-dir:{models / 'clip'}", "--quiet"]
    run = mimetic("translate", pano, missing, "--out", str(tmp_path / "t"), *common)
    assert run.returncode == 1, run.stderr
    out = tmp_path / "t"
    assert sorted(p.name for p in (out / "louvre").iterdir()) == ["round_001.png", "round_002.png", "round_003.png"]
    assert (out / "louvre.mp4").is_file() and (out / "louvre-contact.png").is_file()
    with Image.open(out / "louvre-contact.png") as sheet:
        assert sheet.width == 3 * 192 and sheet.height > 192  # three rounds, text beneath
    record = json.loads((out / "translate.json").read_text())
    assert [(i["source"], i["error"] is None, len(i["rounds"])) for i in record["images"]] == [(pano, True, 3), (missing, False, 0)]
    rows = list(csv.DictReader((out / "louvre-drift.csv").read_text().splitlines()))
    assert [r["round"] for r in rows] == ["1", "2", "3"] and rows[1]["image"] == "louvre/round_002.png"
    assert rows[0]["text"] == record["images"][0]["rounds"][0]["text"]
    again = mimetic("translate", pano, "--out", str(tmp_path / "t2"), *common)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "t2" / "louvre-drift.csv").read_bytes() == (out / "louvre-drift.csv").read_bytes()


def test_mimetic_translate_rounds_0_is_one_line_exit_2(tmp_path):
    run = mimetic("translate", "x.png", "--rounds", "0", "--out", str(tmp_path / "t"))
    assert run.returncode == 2 and "rounds (--rounds) must be a positive integer" in run.stderr
    assert not (tmp_path / "t").exists()
