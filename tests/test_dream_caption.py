"""`mimetic dream --prompt-from caption`: each view's interrogator prompt becomes its dream prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine import Engine, EngineConfig, Panorama, cli
from engine.decode import required_width
from engine.dream.dream import dream, save_dreams
from engine.dream.interrogate import interrogator_prompt
from engine.dream.params import DreamParams
from engine.models.caption import Captioner
from engine.models.diffusion import Dreamer
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_caption import make_tiny_caption
from engine.models.tiny_sd import make_tiny_sd

FLAVOURS = ("mediums", "styles")
STEPS = 4


def mimetic(*argv: str) -> int:
    """``mimetic ARGV`` in-process, through ``engine.cli.main`` and its one error handler."""
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    make_tiny_clip(folder), make_tiny_sd(folder), make_tiny_caption(folder)
    return folder


@pytest.fixture(scope="module")
def trio(models):
    engine = Engine(EngineConfig(clip_model=f"local-dir:{models / 'clip'}", views="ring4", top_k=2, vocabularies=()))
    return engine, Dreamer(models / "sd"), Captioner(models / "caption", beams=2, max_tokens=8)


@pytest.fixture(scope="module")
def louvre_small(louvre) -> np.ndarray:
    return np.asarray(Image.fromarray(louvre).resize((512, 256), Image.Resampling.BILINEAR))


def test_each_view_is_dreamt_from_its_own_caption_and_flavours(trio, louvre_small, tmp_path):
    engine, dreamer, captioner = trio
    params = DreamParams(prompt_from="caption", flavours=FLAVOURS, strength=0.5, steps=STEPS, seed=3)
    [result] = dream(engine, dreamer, [Panorama(id="louvre", data=louvre_small)], params, captioner=captioner)
    assert result.error is None and len(result.dreams) == 4

    # Recomputed independently: the captioner's own captions of the views it cuts, and CLIP's top flavour per view.
    views = dreamer.views(engine.views)
    width = max(required_width(views), required_width(captioner.views(engine.views)))
    from engine.decode import decode_image

    pixels = decode_image(louvre_small, name="louvre", min_width=width)
    captions = captioner.caption(captioner.render([pixels], engine.views)[0])
    [seen] = engine.embed([Panorama(id="louvre", data=louvre_small)])
    for n, d in enumerate(result.dreams):
        tops = {name: seen.readings[name]["views"][n][0] for name in FLAVOURS}
        assert d.caption == captions[n]
        assert d.prompt == interrogator_prompt(captions[n], tops, FLAVOURS)
        assert [label for label, _ in d.labels["mediums"]] == [label for label, _ in seen.readings["mediums"]["views"][n]]
    assert len({d.caption for d in result.dreams}) > 1  # each view read on its own, not one caption for all

    record = json.loads(save_dreams([result], tmp_path, engine=engine, dreamer=dreamer, params=params, captioner=captioner).read_text())
    assert record["parameters"]["prompt_from"] == "caption" and record["parameters"]["flavours"] == list(FLAVOURS)
    assert record["captioner"]["architecture"] == "BlipForConditionalGeneration" and record["captioner"]["beams"] == 2
    assert list(record["flavours"]) == list(FLAVOURS)
    rows = record["panoramas"][0]["dreams"]
    assert [(r["caption"], r["prompt"]) for r in rows] == [(d.caption, d.prompt) for d in result.dreams]

    # Deterministic, and the same dream as one from the same prompt given directly.
    [again] = dream(engine, dreamer, [Panorama(id="louvre", data=louvre_small)], params, captioner=captioner)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(result.dreams, again.dreams, strict=True))
    direct = DreamParams(prompt=result.dreams[0].prompt, strength=0.5, steps=STEPS, seed=3)
    [same] = dream(engine, dreamer, [Panorama(id="louvre", data=louvre_small)], direct)
    assert np.array_equal(same.dreams[0].image, result.dreams[0].image)


def test_a_bad_panorama_gets_its_error_and_the_others_are_captioned(trio, louvre_small):
    engine, dreamer, captioner = trio
    params = DreamParams(prompt_from="caption", flavours=("styles",), strength=0.5, steps=STEPS)
    broken, good = dream(engine, dreamer, [Panorama(id="broken", data=b"nope"), Panorama(id="louvre", data=louvre_small)],
                         params, captioner=captioner)
    assert "broken" in broken.error and not broken.dreams
    assert good.error is None and all(d.caption is not None and d.prompt for d in good.dreams)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (DreamParams(prompt="a street", prompt_from="caption"), "one of a prompt"),
        (DreamParams(from_labels=("styles",), prompt_from="caption"), "one of a prompt"),
        (DreamParams(prompt_from="labels"), "must be one of caption"),
        (DreamParams(prompt="a street", flavours=("styles",)), "need prompt_from"),
        (DreamParams(prompt_from="caption", flavours=("no-such-vocabulary",)), "no-such-vocabulary"),
        (DreamParams(prompt_from="caption", flavours=("styles", "styles")), "twice"),
    ],
)
def test_bad_caption_prompt_parameters_are_refused_before_any_work(params, message):
    with pytest.raises(ValueError, match=message):
        params.check()


def test_prompt_from_caption_needs_a_captioner(trio, louvre_small):
    engine, dreamer, _ = trio
    with pytest.raises(ValueError, match="needs a captioner"):
        dream(engine, dreamer, [Panorama(id="louvre", data=louvre_small)], DreamParams(prompt_from="caption"))


def test_mimetic_dream_prompt_from_caption_records_each_views_prompt(models, louvre_small, tmp_path, capsys):
    Image.fromarray(louvre_small).save(tmp_path / "louvre.jpg")
    out = tmp_path / "out"
    argv = ["dream", str(tmp_path / "louvre.jpg"), "--prompt-from", "caption", "--flavours", "mediums,movements",
            "--steps", "4", "--strength", "0.5", "--out", str(out), "--sd-model", str(models / "sd"),
            "--clip-model", f"local-dir:{models / 'clip'}", "--views", "ring4", "--caption-beams", "1", "--quiet"]
    assert mimetic(*argv, "--caption-model", str(models / "caption")) == 0, capsys.readouterr().err
    record = json.loads((out / "dreams.json").read_text())
    rows = record["panoramas"][0]["dreams"]
    assert len(rows) == 4 and record["captioner"]["beams"] == 1
    for row in rows:
        top = [row["labels"][name][0][0] for name in ("mediums", "movements")]
        assert row["prompt"] == ", ".join([row["caption"], *top] if row["caption"] else top)

    # Without a captioner it is one line naming the flag to pass, and exit status 2, before any model loads.
    capsys.readouterr()
    assert mimetic(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--caption-model" in err[0]
