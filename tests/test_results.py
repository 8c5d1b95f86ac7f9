"""The one results schema: what ``mimetic embed`` writes is typed like an ingest run's tables, reads back as
the EmbedResults it came from, and ``mimetic query`` ranks it as it ranks a run folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine import Engine, EngineConfig, Panorama
from engine.ingest.inputs import InputError
from engine.ingest.job import ingest
from engine.ingest.query import query
from engine.ingest.run import read_run
from engine.models.tiny import make_tiny_clip
from engine.results import read_engine_config, read_labels, results_table, write_csv, write_parquet

from .conftest import PANORAMAS
from .test_cli import mimetic
from .test_ingest import encode, small

TEXT = "a street"
FILES = ("louvre.jpg", "jordan-pond.jpg", "axes.png")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(clip_model) -> Engine:
    return Engine(EngineConfig(clip_model=clip_model, views="ring4", vocabularies=("urban", "styles"), top_k=3,
                               batch_size=16, device="cpu"))


@pytest.fixture(scope="module")
def embedded(engine, louvre, jordan_pond, axes):
    """EmbedResults of three real panoramas and one that fails, as the Engine gives them."""
    panoramas = [Panorama(id=name, data=array, meta={"n": k}) for k, (name, array) in
                 enumerate(zip(FILES, (small(louvre), small(jordan_pond), axes), strict=True))]
    panoramas.append(Panorama(id="broken.jpg", data=b"not an image"))
    return engine.embed(panoramas)


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, embedded, engine):
    return write_parquet(embedded, tmp_path_factory.mktemp("results") / "results.parquet", engine.config)


def _pairs(readings: dict) -> dict:
    return {name: [(label, pytest.approx(p, abs=1e-7)) for label, p in pairs] for name, pairs in readings.items()}


def test_labels_read_back_as_structs_with_the_results_probabilities(results_file, embedded):
    table = pq.read_table(results_file)
    field = table.schema.field("labels")
    assert field.type == pa.list_(pa.struct([("vocabulary", pa.string()), ("label", pa.string()),
                                             ("probability", pa.float32())]))
    rows = table.to_pylist()
    for result in embedded:
        mine = [row for row in rows if row["id"] == result.id]
        if result.error:
            assert [(r["kind"], r["labels"], r["embedding"]) for r in mine] == [("error", None, None)]
            assert "broken.jpg" in mine[0]["error"]
            continue
        views = [r for r in mine if r["kind"] == "view"]
        (pooled,) = [r for r in mine if r["kind"] == "pooled"]
        assert [r["view"] for r in views] == list(range(4))
        assert [(r["yaw"], r["width"], r["height"]) for r in views] == [(v.yaw, v.width, v.height) for v in result.views]
        # float32 in the file: probabilities equal the Engine's to float32 precision
        assert read_labels(pooled["labels"]) == _pairs({name: r["pooled"] for name, r in result.readings.items()})
        for k, row in enumerate(views):
            assert read_labels(row["labels"]) == _pairs({name: r["views"][k] for name, r in result.readings.items()})
            np.testing.assert_array_equal(np.asarray(row["embedding"], np.float16),
                                          result.embeddings[k].float().numpy().astype(np.float16))
        np.testing.assert_array_equal(np.asarray(pooled["embedding"], np.float16),
                                      result.pooled.float().numpy().astype(np.float16))
        assert json.loads(pooled["meta"]) == result.meta
        assert {entry["vocabulary"] for entry in pooled["labels"]} == {"urban", "styles"}
        assert len(pooled["labels"]) == 6  # top_k 3 of each vocabulary


def test_an_embed_file_is_typed_like_an_ingest_run(tmp_path, results_file, clip_model, louvre, jordan_pond):
    dump = tmp_path / "dump"
    dump.mkdir()
    for name, array in (("a.jpg", louvre), ("b.jpg", jordan_pond)):
        (dump / name).write_bytes(encode(small(array)))
    engine = Engine(EngineConfig(clip_model=clip_model, views="ring4", vocabularies=("urban", "styles"), top_k=3,
                                 batch_size=16, device="cpu"))
    ingest(dump, tmp_path / "run", engine=engine, quiet=True)
    embedded = pq.read_schema(results_file)
    for table in ("views", "panoramas"):
        run = read_run(tmp_path / "run", table).schema
        shared = [name for name in run.names if name in embedded.names]
        assert {"id", "embedding", "labels"} <= set(shared), table
        for name in shared:
            assert run.field(name).type == embedded.field(name).type, (table, name)
    assert set(read_run(tmp_path / "run", "views").schema.names) >= {"view", "yaw", "pitch", "roll", "fov", "width", "height"}


def test_the_file_records_the_model_that_wrote_it(results_file, engine):
    stored = read_engine_config(results_file)
    assert stored["clip_model"] == engine.config.clip_model and stored["views"] == "ring4"


def test_query_ranks_a_results_file_exactly(results_file, engine):
    text = engine.embed_text([TEXT])[0].double().numpy()
    table = pq.read_table(results_file).to_pylist()
    for views, kind in ((False, "pooled"), (True, "view")):
        rows = [r for r in table if r["kind"] == kind]
        scores = np.asarray([r["embedding"] for r in rows], np.float64) @ text
        order = np.argsort(-scores, kind="stable")
        result = query(results_file, TEXT, top=2, views=views, engine=engine)
        assert result.rows == len(rows) == (3 if kind == "pooled" else 12)  # the failure has no embedding
        expected = [(rows[k]["id"], rows[k]["view"]) for k in order]
        assert [(r["id"], r.get("view")) for r in result.positive] == expected[:2]
        rest = expected[2:]  # no row is both a top and a bottom result
        assert [(r["id"], r.get("view")) for r in result.negative] == rest[::-1][:2]
        np.testing.assert_allclose([r["score"] for r in result.positive], scores[order][:2], atol=1e-5)
        assert all(r["lat"] is None and r["lon"] is None for r in result.positive)  # embed has no coordinates


def test_query_refuses_a_parquet_file_that_is_not_a_results_file(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)
    with pytest.raises(InputError, match="not a mimetic results file"):
        query(other, TEXT)
    text = tmp_path / "notes.parquet"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a Parquet file"):
        query(text, TEXT)


def test_any_arrow_tool_reads_the_typed_columns(results_file):
    # pyarrow without this package: labels flatten to plain columns, embeddings to a float16 matrix
    table = pq.read_table(results_file, filters=[("kind", "=", "pooled")])
    flat = pa.Table.from_batches(table.to_batches()).column("labels").combine_chunks().flatten()
    assert flat.type.num_fields == 3 and len(flat) == 3 * 6
    assert table.column("embedding").combine_chunks().flatten().type == pa.float16()
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(results_file)
    assert set(frame["kind"]) == {"view", "pooled", "error"}


def test_duckdb_reads_the_labels_as_structs(results_file):
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT id, unnest(labels).probability AS p FROM '{results_file}' WHERE kind = 'pooled'").fetchall()
    assert len(rows) == 18 and all(0 <= p <= 1 for _, p in rows)


def test_an_empty_or_all_failed_batch_still_has_the_schema(engine):
    table = results_table([], engine.config)
    assert table.num_rows == 0 and table.schema.field("labels").type.value_type.num_fields == 3
    assert json.loads(table.schema.metadata[b"mimetic"])["engine_config"]["views"] == "ring4"


def test_write_csv_stays_spreadsheet_safe(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"id": "=HYPERLINK(1)", "score": -0.25}], ["id", "score"])
    with open(path, newline="") as stream:
        (row,) = list(csv.DictReader(stream))
    assert row == {"id": "'=HYPERLINK(1)", "score": "-0.25"}


def test_embed_then_query_end_to_end(tmp_path, clip_model):
    """``mimetic embed`` then ``mimetic query results.parquet "a street"``, as a user runs them."""
    out = tmp_path / "results.parquet"
    run = mimetic("embed", *(str(PANORAMAS / name) for name in FILES), "--out", str(out), "--clip-model", clip_model,
                  "--views", "ring4", "--vocabularies", "urban", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    run = mimetic("query", str(out), TEXT, "--top", "1", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "3 panoramas scored" in run.stdout

    # the command embedded the text with the file's own model: the same ranking, recomputed here
    engine = Engine(EngineConfig(clip_model=clip_model, views="ring4", vocabularies=(), device="cpu"))
    text = engine.embed_text([TEXT])[0].double().numpy()
    rows = [r for r in pq.read_table(out).to_pylist() if r["kind"] == "pooled"]
    scores = np.asarray([r["embedding"] for r in rows], np.float64) @ text
    with open(tmp_path / "queries" / "a-street.csv", newline="") as stream:
        written = list(csv.DictReader(stream))
    assert [(r["polarity"], r["id"]) for r in written] == [
        ("positive", rows[int(np.argmax(scores))]["id"]), ("negative", rows[int(np.argmin(scores))]["id"])]
    assert float(written[0]["score"]) == pytest.approx(scores.max(), abs=1e-5)
    geojson = json.loads((tmp_path / "queries" / "a-street.geojson").read_text())
    assert geojson["query"] == TEXT and [f["geometry"] for f in geojson["features"]] == [None, None]


def test_demo_output_is_queryable_over_views(tmp_path, clip_model):
    run = mimetic("demo", "--out", str(tmp_path), "--clip-model", clip_model, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    run = mimetic("query", str(tmp_path / "results.parquet"), TEXT, "--views", "--top", "2", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "synthetic-street" in run.stdout
    views = json.loads((tmp_path / "queries" / "a-street-views.geojson").read_text())["features"]
    assert [f["properties"]["rank"] for f in views] == [1, 2, 1, 2]
    assert all(f["properties"]["id"] == "synthetic-street" for f in views)


def test_query_is_scored_in_fp32_whatever_the_model_runs_in(results_file, engine, monkeypatch):
    """The scoring product is fp32 for an fp32, fp16 or bf16 model alike (not guessed from the device, nor
    in a bf16 model's own dtype, which ties close scores)."""
    seen = []
    original = torch.Tensor.__matmul__

    def spy(self, other):
        if other.dim() == 1:  # the scoring product: stored embeddings @ the query vector
            seen.append((self.dtype, other.dtype))
        return original(self, other)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    monkeypatch.setattr(engine.clip, "dtype", torch.bfloat16)
    query(results_file, TEXT, top=1, engine=engine)
    assert seen and all(pair == (torch.float32, torch.float32) for pair in seen)
