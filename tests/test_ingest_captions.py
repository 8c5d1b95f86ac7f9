"""`mimetic ingest --captions` and the Engine's captioner: a caption and an interrogator prompt per view."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine import Engine, EngineConfig, Panorama, cli
from engine.config import CaptionSettings
from engine.decode import decode_image, required_width
from engine.dream.interrogate import interrogator_prompt
from engine.ingest.inputs import RunMismatchError
from engine.ingest.job import ingest
from engine.ingest.run import read_run
from engine.models.caption import Captioner
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_caption import make_tiny_caption
from engine.results import read_labels

FLAVOURS = ("mediums", "movements")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    make_tiny_clip(folder), make_tiny_caption(folder)
    return folder


@pytest.fixture(scope="module")
def config(models) -> EngineConfig:
    return EngineConfig(clip_model=f"local-dir:{models / 'clip'}", views="ring4", batch_size=16, top_k=2, vocabularies=("styles",))


@pytest.fixture(scope="module")
def captioner(models) -> Captioner:
    return Captioner(models / "caption", beams=2, max_tokens=8)


@pytest.fixture(scope="module")
def dump(tmp_path_factory, louvre, jordan_pond):
    folder = tmp_path_factory.mktemp("dump")
    for name, pano in (("louvre", louvre), ("pond", jordan_pond)):
        Image.fromarray(pano).resize((1024, 512), Image.Resampling.BILINEAR).save(folder / f"{name}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_the_engine_captions_each_view_from_the_panorama_it_embeds(config, captioner, dump):
    engine = Engine(config)
    good, broken = engine.embed([Panorama(id="louvre", data=dump / "louvre.jpg"), Panorama(id="broken", data=dump / "broken.jpg")],
                                captioner=captioner)
    assert broken.error and broken.captions is None
    # The captioner's own reading of its views, cut from the panorama decoded as wide as either model needs.
    width = max(engine.min_decode_width, required_width(captioner.views(engine.views)))
    pixels = decode_image(dump / "louvre.jpg", min_width=width)
    assert good.captions == captioner.caption(captioner.render([pixels], engine.views)[0])
    assert len(good.captions) == 4 and len(set(good.captions)) > 1
    # The embeddings are those of an Engine call without a captioner: captioning changes nothing CLIP sees.
    [plain] = engine.embed([Panorama(id="louvre", data=dump / "louvre.jpg")])
    assert plain.captions is None and np.allclose(plain.embeddings.float(), good.embeddings.float(), atol=2e-3)


def test_ingest_with_captions_adds_a_caption_and_prompt_per_view(config, captioner, dump, tmp_path):
    settings = CaptionSettings(str(captioner.folder), beams=2, max_tokens=8, flavours=FLAVOURS)
    summary = ingest(dump, tmp_path / "run", config=config, quiet=True, captions=settings)
    assert summary["panoramas"] == 2 and summary["quarantined"] == 1
    views = read_run(tmp_path / "run", "views").to_pylist()
    assert len(views) == 8
    engine = Engine(config)
    by_id = {r.id: r for r in engine.embed([Panorama(id=i, data=dump / f"{i}.jpg") for i in ("louvre", "pond")], captioner=captioner)}
    for row in views:
        caption = by_id[row["id"]].captions[row["view"]]
        assert row["caption"] == caption
        tops = {name: read_labels(row["labels"])[name][0] for name in FLAVOURS}
        assert row["prompt"] == interrogator_prompt(caption, tops, FLAVOURS)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    recorded = manifest["config"]["captions"]
    assert recorded["beams"] == 2 and recorded["flavours"] == list(FLAVOURS) and recorded["model_bytes"] > 0
    # The flavours are read like any vocabulary: they join the run's vocabularies.
    assert set(FLAVOURS) <= set(manifest["config"]["vocabularies"])

    # The captioner is part of the settings: resuming with other decoding is refused, the same resumes.
    with pytest.raises(RunMismatchError, match="captions"):
        ingest(dump, tmp_path / "run", config=config, quiet=True, captions=CaptionSettings(settings.model, beams=1, max_tokens=8, flavours=FLAVOURS))
    again = ingest(dump, tmp_path / "run", config=config, quiet=True, captions=settings)
    assert again["this_invocation"]["panoramas"] == 0 and again["complete"]


def test_without_captions_the_columns_are_there_and_null(config, dump, tmp_path):
    ingest(dump, tmp_path / "run", config=config, quiet=True)
    views = read_run(tmp_path / "run", "views")
    assert {"caption", "prompt"} <= set(views.column_names)
    assert views.column("caption").null_count == views.num_rows == 8


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--captions"], "--captions needs --caption-model"),
        (["--caption-model", "{models}/caption"], "--caption-model is used with --captions"),
        (["--captions", "--caption-model", "{models}/nowhere"], "caption model not found"),
        (["--captions", "--caption-model", "{models}/caption", "--flavours", "no-such-vocabulary"], "no-such-vocabulary"),
    ],
)
def test_mimetic_ingest_caption_mistakes_are_one_line_and_exit_2(flags, message, models, dump, tmp_path, capsys):
    argv = ["ingest", str(dump), "--out", str(tmp_path / "run"), "--clip-model", f"local-dir:{models / 'clip'}",
            *(flag.format(models=models) for flag in flags)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
