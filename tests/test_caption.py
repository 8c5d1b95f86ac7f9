"""Captions and interrogator prompts over views (engine.dream.interrogate) on the tiny CLIP and BLIP."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import Engine, EngineConfig, Panorama
from engine.dream.interrogate import interrogate, interrogator_prompt, write_captions
from engine.models.caption import Captioner
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_caption import make_tiny_caption
from engine.results import read_labels

from .conftest import PANORAMAS

FLAVOURS = ("mediums", "movements", "styles")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return make_tiny_clip(folder), make_tiny_caption(folder)


@pytest.fixture(scope="module")
def engine(models):
    return Engine(EngineConfig(clip_model=f"local-dir:{models[0]}", views="ring4", vocabularies=FLAVOURS))


@pytest.fixture(scope="module")
def captioner(models):
    return Captioner(models[1])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    crop = folder / "crop.jpg"
    with Image.open(PANORAMAS / "louvre.jpg") as im:
        im.convert("RGB").crop((1500, 700, 2300, 1300)).save(crop)  # a plain 4:3 photograph of the square
    (folder / "broken.jpg").write_bytes((PANORAMAS / "louvre.jpg").read_bytes()[:2000])
    return [Panorama(id="louvre", data=PANORAMAS / "louvre.jpg"), Panorama(id="broken", data=folder / "broken.jpg"),
            Panorama(id="crop", data=crop)]


@pytest.fixture(scope="module")
def captioned(engine, captioner, inputs):
    return interrogate(engine, captioner, inputs, FLAVOURS, plain=None)


def test_the_prompt_is_the_caption_then_each_flavours_top_label_in_order():
    flavours = {"styles": ("Baroque architecture", 0.6), "mediums": ("an oil painting", 0.3)}
    assert interrogator_prompt("a street", flavours, ("mediums", "styles")) == "a street, an oil painting, Baroque architecture"
    assert interrogator_prompt("", flavours, ("styles",)) == "Baroque architecture"  # an empty caption is left out


def test_every_view_gets_its_own_caption_and_clips_top_flavour_labels(captioned, engine, captioner):
    louvre = captioned[0]
    assert louvre.error is None and not louvre.plain and len(louvre.captions) == 4
    # The captions are the captioner's own for the views it cuts at its size.
    from engine.decode import decode_image, required_width

    # Decoded once, at the width the denser of the two models' views needs (DCT scaling below that).
    width = max(engine.min_decode_width, required_width(captioner.views(engine.views)))
    image = decode_image(PANORAMAS / "louvre.jpg", min_width=width)
    assert louvre.captions == captioner.caption(captioner.render([image], engine.views)[0])
    [result] = engine.embed([Panorama(id="louvre", data=PANORAMAS / "louvre.jpg")])
    for k, prompt in enumerate(louvre.prompts):
        tops = [result.readings[name]["views"][k][0] for name in FLAVOURS]
        assert [label for label, _ in tops] == [louvre.flavours[k][name][0] for name in FLAVOURS]
        assert prompt == ", ".join([louvre.captions[k], *(label for label, _ in tops)] if louvre.captions[k] else [t[0] for t in tops])


def test_a_bad_input_gets_its_error_and_a_plain_image_is_read_whole(captioned):
    assert [c.id for c in captioned] == ["louvre", "broken", "crop"]
    broken = captioned[1]
    assert broken.error is not None and broken.error.startswith("broken:") and broken.captions == []
    crop = captioned[2]
    assert crop.error is None and crop.plain and len(crop.captions) == 1 and len(crop.prompts) == 1


def test_csv_and_parquet_hold_a_row_per_view_and_two_runs_are_identical(engine, captioner, inputs, captioned, tmp_path):
    first = write_captions(captioned, tmp_path / "a.csv", FLAVOURS)
    again = write_captions(interrogate(engine, captioner, inputs, FLAVOURS, plain=None), tmp_path / "b.csv", FLAVOURS)
    assert first.read_bytes() == again.read_bytes()
    rows = list(csv.DictReader(first.read_text().splitlines()))
    assert [r["id"] for r in rows] == ["louvre"] * 4 + ["broken", "crop"]
    assert [float(r["yaw"]) for r in rows[:4]] == [0, 90, 180, 270]
    assert rows[4]["error"].startswith("broken:") and rows[4]["caption"] == ""
    assert rows[0]["prompt"] == captioned[0].prompts[0] and float(rows[0]["styles_probability"]) == pytest.approx(captioned[0].flavours[0]["styles"][1])
    table = pq.read_table(write_captions(captioned, tmp_path / "c.parquet", FLAVOURS, engine.config)).to_pylist()
    assert [r["kind"] for r in table] == ["view"] * 4 + ["error", "view"]
    assert table[0]["caption"] == captioned[0].captions[0] and table[5]["view"] is None
    assert {name: pairs[0][0] for name, pairs in read_labels(table[0]["labels"]).items()} == \
        {name: captioned[0].flavours[0][name][0] for name in FLAVOURS}
    assert len(table[0]["embedding"]) == 32


def test_a_flavour_the_engine_did_not_load_is_refused_before_any_work(engine, captioner):
    with pytest.raises(ValueError, match="flavour vocabularies urban are not loaded"):
        interrogate(engine, captioner, [Panorama(id="x", data=np.zeros((4, 8, 3), np.uint8))], ("styles", "urban"))


def test_a_captions_file_must_be_csv_or_parquet(captioned, tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.csv or \.parquet"):
        write_captions(captioned, tmp_path / "c.json", FLAVOURS)


# -- the command ------------------------------------------------------------------------------------


def test_mimetic_caption_writes_a_row_per_view_is_deterministic_and_keeps_going(tmp_path):
    from .test_cli import mimetic

    assert mimetic("models", "make-tiny", str(tmp_path / "m")).returncode == 0
    assert (tmp_path / "m" / "caption" / "config.json").is_file()  # make-tiny writes the captioner too
    common = ["--caption-model", str(tmp_path / "m" / "caption"), "--clip-model", f"local-dir:{tmp_path / 'm' / 'clip'}",
              "--views", "ring4", "--quiet"]
    missing = str(tmp_path / "missing.jpg")
    first = mimetic("caption", str(PANORAMAS / "louvre.jpg"), missing, "--out", str(tmp_path / "a.csv"), *common)
    assert first.returncode == 1, first.stderr  # one input failed; the other was captioned
    assert f"{missing}: cannot read the file" in first.stderr and "4 captions of 1 of 2 images" in first.stdout
    second = mimetic("caption", str(PANORAMAS / "louvre.jpg"), missing, "--out", str(tmp_path / "b.csv"), *common)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert second.returncode == 1
    rows = list(csv.DictReader((tmp_path / "a.csv").read_text().splitlines()))
    assert len(rows) == 5 and rows[-1]["error"].startswith(missing)
    # A folder of plain photographs: one caption each.
    photos = tmp_path / "photos"
    photos.mkdir()
    with Image.open(PANORAMAS / "louvre.jpg") as im:
        for k in range(3):
            im.convert("RGB").crop((600 * k, 600, 600 * k + 400, 900)).save(photos / f"p{k}.jpg")
    run = mimetic("caption", *sorted(str(p) for p in photos.iterdir()), "--plain", "--out", str(tmp_path / "p.parquet"), *common)
    assert run.returncode == 0, run.stderr
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["id"].rsplit("/", 1)[-1] for r in table] == ["p0.jpg", "p1.jpg", "p2.jpg"] and all(r["view"] is None for r in table)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--flavours", "nonsense"], "unknown vocabulary 'nonsense'"),
        (["--caption-beams", "0"], "--caption-beams: expected a positive integer"),
        (["--out", "c.txt"], "must end in .csv or .parquet"),
        ([], "no captioner: pass --caption-model DIR"),
    ],
)
def test_mimetic_caption_bad_parameters_are_one_line_and_exit_2(argv, message, tmp_path):
    from .test_cli import mimetic

    args = ["caption", "x.jpg", "--out", str(tmp_path / "c.csv"), *argv]
    run = mimetic(*args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "c.csv").exists()
