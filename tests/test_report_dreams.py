"""``mimetic report`` on a ``mimetic dream`` folder (tiny Stable Diffusion and tiny CLIP): each view's
trajectory view -> steps -> dream in one UMAP, and the view/dream pairs with their mimesis scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from engine import Engine, EngineConfig, Panorama, cli
from engine.dream.dream import dream, save_dreams
from engine.dream.params import DreamParams
from engine.models.diffusion import Dreamer
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_sd import make_tiny_sd


@pytest.fixture(scope="module")
def folder(tmp_path_factory, louvre):
    root = tmp_path_factory.mktemp("dreams")
    engine = Engine(EngineConfig(clip_model=f"local-dir:{make_tiny_clip(root / 'models')}", views="ring4", vocabularies=()))
    dreamer = Dreamer(str(make_tiny_sd(root / "models")))
    params = DreamParams(prompt="a street", strength=1.0, steps=4, trajectory_every=2, batch_size=8)
    pano = np.asarray(Image.fromarray(louvre).resize((512, 256), Image.Resampling.BILINEAR))
    results = dream(engine, dreamer, [Panorama(id="louvre", data=pano)], params)
    save_dreams(results, root / "out", engine=engine, dreamer=dreamer, params=params)
    return root / "out"


def test_each_view_has_its_trajectory_from_view_through_steps_to_dream(folder, tmp_path, capsys):
    assert cli.main(["report", str(folder), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    record = json.loads((folder / "dreams.json").read_text())
    assert len(document["trajectories"]) == 4 == len(record["panoramas"][0]["dreams"])  # ring4
    for t in document["trajectories"]:
        assert t["id"] == "louvre" and t["steps"] == [2, 4] and len(t["points"]) == 4  # view, 2 steps, dream
        assert all(len(p) == 2 and all(np.isfinite(p)) for p in t["points"])
    assert document["umap"]["n"] == 16 and document["umap"]["method"] == "UMAP"  # one fit on all the points
    scores = [d["scores"]["view_dream"] for d in record["panoramas"][0]["dreams"]]
    assert document["scores"]["view_dream"]["n"] == 4 and document["scores"]["view_dream"]["mean"] == pytest.approx(np.mean(scores))
    assert [p["scores"] for p in document["pairs"]] == [d["scores"] for d in record["panoramas"][0]["dreams"]]
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="fig-trajectories"' in page and page.count('alt="dream"') == 4


def test_a_dream_folder_with_a_missing_image_is_one_line_and_exit_2(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dreams.json").write_text((folder / "dreams.json").read_text())
    assert cli.main(["report", str(broken), "--out", str(tmp_path / "report"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the image dreams.json names" in err and len(err.strip().splitlines()) == 1
