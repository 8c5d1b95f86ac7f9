"""``mimetic query`` treats ids and metadata as data: its CSV runs no formula in a spreadsheet (numbers
stay numbers), and what it prints cannot be broken or steered by a control character in an id."""

from __future__ import annotations

import argparse
import csv

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from engine.ingest import cli as ingest_cli
from engine.ingest.inputs import InputItem
from engine.ingest.job import build_shard, ingest
from engine.ingest.query import QueryResult, format_results, printable, write_results
from engine.ingest.run import RunFolder
from engine.models.tiny import make_tiny_clip
from engine.pipeline import EmbedResult

from .test_ingest import build_dump, small, tiny_engine

TEXT = "a baroque church"
# Each is run as a formula (or as a cell move) by Excel, LibreOffice or Sheets if written raw.
FORMULAS = ['=HYPERLINK("http://x","y")', "@SUM(A1)", "+1+1", "-1+2", "\tx", "\rx"]
CONTROLS = ["two\nlines", "red \x1b[31mALERT\x1b[0m", "over\rwritten", "bidi \u202egnp.exe"]


def _plant(engine, run, rows: list[tuple[str, str, str, torch.Tensor]]) -> None:
    """Commit one more shard of panoramas (id, source, captured_at, pooled embedding), each at its own place."""
    folder = RunFolder(run)
    folder.load_manifest()
    shard = max(int(k) for k in folder.manifest["shards"]) + 1
    done = []
    for k, (key, source, captured_at, vector) in enumerate(rows):
        views = torch.nn.functional.normalize(torch.randn(len(engine.views), vector.numel()), dim=1)
        result = EmbedResult(id=key, views=engine.views, embeddings=views, pooled=vector, meta={})
        result.readings = {}
        item = InputItem(id=key, source=source, meta={"lat": 41.9 + k * 1e-3, "lon": 12.48 + k * 1e-3, "captured_at": captured_at})
        done.append((item, result))
    folder.commit(build_shard(folder, shard, done, north_up=False, context={}, seconds=0.0))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, louvre):
    """A run of 2 panoramas plus planted ones whose ids, sources and times are formulas or hold control
    characters: the formula ids match the text best (score 1), "-1+2" matches it worst (score -1)."""
    engine = tiny_engine(f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}")
    root = tmp_path_factory.mktemp("hostile")
    dump, metadata, _ = build_dump(root, [small(louvre)], count=2)
    out = root / "run"
    ingest(dump, out, engine=engine, metadata=[metadata], shard_size=5, quiet=True)
    text = engine.embed_text([TEXT])[0].float()
    torch.manual_seed(0)
    rows = [(key, key, key, text) for key in FORMULAS if key != "-1+2"]  # the id is the source and the time too
    rows += [(key, "plain", "2019-04-23", torch.nn.functional.normalize(text + 0.3 * torch.randn_like(text), dim=0)) for key in CONTROLS]
    rows.append(("-1+2", "-1+2", "-1+2", -text))
    _plant(engine, out, rows)
    return out, engine


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    ingest_cli.add_parsers(parser.add_subparsers(dest="command"))
    return ingest_cli.run(parser.parse_args(list(argv)))


def test_the_query_csv_escapes_formulas_and_keeps_numbers(hostile_run, capsys):
    run, _ = hostile_run
    assert _cli("query", str(run), TEXT, "--top", "6", "--device", "cpu") == 0
    capsys.readouterr()
    path = run / "queries" / "a-baroque-church.csv"
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    by_id = {row["id"]: row for row in rows}
    for formula in FORMULAS:  # every formula cell, wherever it stands, is text beginning with '
        assert "'" + formula in by_id, sorted(by_id)
        assert formula not in by_id
    for row in rows:
        for column in ("id", "source", "captured_at"):
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), (column, row[column])
    worst = by_id["'-1+2"]
    assert worst["polarity"] == "negative" and worst["rank"] == "1"
    assert worst["score"].startswith("-") and float(worst["score"]) == pytest.approx(-1.0, abs=2e-3)  # a number, not '-1.0
    assert by_id["'=HYPERLINK(\"http://x\",\"y\")"]["source"] == "'=HYPERLINK(\"http://x\",\"y\")"
    assert by_id["'@SUM(A1)"]["captured_at"] == "'@SUM(A1)"

    # The way a spreadsheet-like reader sees it: numeric columns typed as numbers, the rest as text.
    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    assert table.schema.field("score").type == pa.float64() and table.schema.field("rank").type == pa.int64()
    assert table.schema.field("lat").type == pa.float64() and table.schema.field("lon").type == pa.float64()
    assert table.schema.field("id").type == pa.string()
    assert min(table.column("score").to_pylist()) == pytest.approx(-1.0, abs=2e-3)
    assert {"'" + f for f in FORMULAS} <= set(table.column("id").to_pylist())


def test_the_query_command_prints_one_line_per_row_with_control_characters_escaped(hostile_run, capsys):
    run, _ = hostile_run
    assert _cli("query", str(run), TEXT, "--top", "12", "--device", "cpu") == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    table = lines[: lines.index(next(line for line in lines if line.startswith("wrote ")))]
    scored = 2 + len(FORMULAS) - 1 + len(CONTROLS) + 1
    assert len(table) == 3 + scored  # a heading, "top:", "bottom:" and one line per row
    assert "\x1b" not in printed and "\r" not in printed and "\u202e" not in printed
    for key in CONTROLS:
        assert sum(printable(key) in line for line in table) == 1
    assert r"two\nlines" in printed and r"red \x1b[31mALERT\x1b[0m" in printed and r"over\rwritten" in printed
    assert r"bidi \u202egnp.exe" in printed
    assert r"\tx" in printed and r"\rx" in printed  # the formula ids that are also control characters


def test_write_results_and_format_results_on_a_hand_made_ranking(tmp_path):
    rows = [
        {"polarity": "positive", "rank": 1, "score": 0.5, "id": "=1+1", "lat": 1.0, "lon": 2.0, "heading": None,
         "captured_at": "@now", "source": "+x"},
        {"polarity": "negative", "rank": 1, "score": -0.25, "id": "a\nb\x1b[2J", "lat": None, "lon": None, "heading": -90.0,
         "captured_at": "-", "source": "fine"},
    ]
    result = QueryResult(TEXT, "panoramas", 2, rows[:1], rows[1:])
    csv_path, _ = write_results(result, tmp_path / "q")
    with open(csv_path, newline="", encoding="utf-8") as stream:
        first, second = csv.DictReader(stream)
    assert (first["id"], first["captured_at"], first["source"], first["heading"]) == ("'=1+1", "'@now", "'+x", "")
    assert (second["score"], second["heading"], second["captured_at"]) == ("-0.25", "-90.0", "'-")
    text = format_results(result)
    assert text.count("\n") == 4 and r"a\nb\x1b[2J" in text and "\x1b" not in text
