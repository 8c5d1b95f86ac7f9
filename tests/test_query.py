"""``mimetic query``: exact text ranking over a run folder, printed and written as CSV and GeoJSON."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch

from engine.ingest import cli as ingest_cli
from engine.ingest.inputs import InputItem
from engine.ingest.job import build_shard, ingest
from engine.ingest.query import query
from engine.ingest.run import RunFolder, read_run
from engine.models.tiny import make_tiny_clip
from engine.pipeline import EmbedResult

from .test_ingest import build_dump, small, tiny_engine

TEXT = "a baroque church"


def planted(engine, run, vector: torch.Tensor, *, key: str, lat: float, lon: float, view: int) -> None:
    """Commit one more shard holding a panorama whose view ``view`` embeds exactly as ``vector``, and
    whose pooled embedding is ``vector`` too: the one match the query must find first."""
    torch.manual_seed(0)
    others = torch.nn.functional.normalize(torch.randn(len(engine.views), vector.numel()), dim=1)
    others[view] = vector
    result = EmbedResult(id=key, views=engine.views, embeddings=others, pooled=vector, meta={})
    result.readings = {"styles": {"pooled": [("Baroque architecture", 1.0)], "views": [[("Baroque architecture", 1.0)]] * 8}}
    folder = RunFolder(run)
    folder.load_manifest()
    shard = folder.shards() + len([k for k in folder.manifest["shards"] if int(k) >= folder.shards()])
    item = InputItem(id=key, source="planted", meta={"lat": lat, "lon": lon})
    folder.commit(build_shard(folder, shard, [(item, result)], north_up=False, context={}, seconds=0.0))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}")


@pytest.fixture(scope="module")
def run(tmp_path_factory, louvre, jordan_pond, engine):
    root = tmp_path_factory.mktemp("query")
    dump, metadata, _ = build_dump(root, [small(louvre), small(jordan_pond)], count=12)
    out = root / "run"
    ingest(dump, out, engine=engine, metadata=[metadata], shard_size=5, quiet=True)
    text = engine.embed_text([TEXT])[0].float()
    planted(engine, out, text, key="planted-match", lat=41.9009, lon=12.4833, view=3)
    planted(engine, out, -text, key="planted-opposite", lat=40.0, lon=10.0, view=5)
    return out


def test_query_ranks_the_planted_match_first_and_its_opposite_last(run, engine):
    result = query(run, TEXT, top=4, engine=engine)
    assert result.rows == 14  # 12 panoramas + 2 planted; the quarantine holds no embeddings
    assert result.positive[0]["id"] == "planted-match" and result.positive[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert result.negative[0]["id"] == "planted-opposite" and result.negative[0]["score"] == pytest.approx(-1.0, abs=2e-3)
    assert (result.positive[0]["lat"], result.positive[0]["lon"]) == (41.9009, 12.4833)

    # Exact: the same order as a plain float64 product over every stored embedding.
    table = read_run(run, "panoramas", columns=["id", "embedding"]).to_pydict()
    text = engine.embed_text([TEXT])[0].double().numpy()
    scores = np.asarray(table["embedding"], np.float64) @ text
    order = [table["id"][k] for k in np.argsort(-scores, kind="stable")]
    assert [r["id"] for r in result.positive] == order[:4]
    assert [r["id"] for r in result.negative] == order[::-1][:4]
    np.testing.assert_allclose([r["score"] for r in result.positive], np.sort(scores)[::-1][:4], atol=1e-5)
    assert [r["rank"] for r in result.positive] == [1, 2, 3, 4]


def test_a_bf16_engine_scores_the_stored_embeddings_at_full_precision(run, engine):
    import dataclasses

    from engine import Engine

    bf16 = Engine(dataclasses.replace(engine.config, precision="bf16"))
    result = query(run, TEXT, top=5, engine=bf16)
    table = read_run(run, "panoramas", columns=["id", "embedding"]).to_pydict()
    text = bf16.embed_text([TEXT])[0].double().numpy()  # the bf16 model's own text vector
    scores = np.asarray(table["embedding"], np.float64) @ text
    np.testing.assert_allclose([r["score"] for r in result.positive], np.sort(scores)[::-1][:5], atol=1e-5)
    assert [r["id"] for r in result.positive] == [table["id"][k] for k in np.argsort(-scores, kind="stable")][:5]


def test_query_over_views_finds_the_planted_view(run, engine):
    result = query(run, TEXT, top=3, views=True, engine=engine)
    assert result.rows == 14 * 8
    best = result.positive[0]
    assert (best["id"], best["view"], best["yaw"]) == ("planted-match", 3, 135.0)
    assert (result.negative[0]["id"], result.negative[0]["view"]) == ("planted-opposite", 5)


def test_no_row_is_both_a_top_and_a_bottom_result(run, engine):
    result = query(run, TEXT, top=10, engine=engine)
    assert len(result.positive) == 10 and len(result.negative) == 4
    assert not {r["id"] for r in result.positive} & {r["id"] for r in result.negative}


def test_the_query_command_prints_and_writes_csv_and_geojson(run, capsys):
    parser = argparse.ArgumentParser()
    ingest_cli.add_parsers(parser.add_subparsers(dest="command"))
    assert ingest_cli.run(parser.parse_args(["query", str(run), TEXT, "--top", "2", "--device", "cpu"])) == 0
    printed = capsys.readouterr().out
    assert "planted-match" in printed and "top:" in printed and "bottom:" in printed

    with open(run / "queries" / "a-baroque-church.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["polarity"] for r in rows] == ["positive", "positive", "negative", "negative"]
    assert rows[0]["id"] == "planted-match" and rows[2]["id"] == "planted-opposite"
    geojson = json.loads((run / "queries" / "a-baroque-church.geojson").read_text())
    assert geojson["type"] == "FeatureCollection" and geojson["query"] == TEXT
    first, _, last, _ = geojson["features"]
    assert first["geometry"] == {"type": "Point", "coordinates": [12.4833, 41.9009]}
    assert first["properties"]["polarity"] == "positive" and last["properties"]["polarity"] == "negative"
    assert last["geometry"]["coordinates"] == [10.0, 40.0]

    out = run / "elsewhere" / "views"
    args = parser.parse_args(["query", str(run), TEXT, "--views", "--top", "1", "--out", str(out), "--device", "cpu"])
    assert ingest_cli.run(args) == 0
    views = json.loads(out.with_suffix(".geojson").read_text())["features"]
    assert views[0]["properties"]["id"] == "planted-match" and views[0]["properties"]["view"] == 3


def test_query_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ingest_cli.add_parsers(parser.add_subparsers(dest="command"))
    assert ingest_cli.run(parser.parse_args(["query", str(tmp_path), TEXT])) == 2
    assert "not a mimetic run folder" in capsys.readouterr().err
