"""``mimetic models make-tiny``, ``mimetic embed`` and ``mimetic demo``, run as a user runs them."""

import json

import pyarrow.parquet as pq
import pytest

from .conftest import PANORAMAS
from .test_cli import mimetic


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    run = mimetic("models", "make-tiny", str(out))
    assert run.returncode == 0, run.stderr
    assert (out / "clip" / "open_clip_config.json").is_file()
    assert (out / "clip" / "open_clip_model.safetensors").is_file()
    return out / "clip"


def test_embed_writes_a_row_per_view_and_a_pooled_row(tiny_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes((PANORAMAS / "louvre.jpg").read_bytes()[:3000])
    out = tmp_path / "results.parquet"
    run = mimetic(
        "embed", str(PANORAMAS / "axes.png"), str(bad), str(PANORAMAS / "world-rgba.png"),
        "--out", str(out), "--clip-model", f"local-dir:{tiny_dir}", "--views", "ring4", "--vocabularies", "urban,styles",
        "--batch-size", "8",
    )
    assert run.returncode == 1, run.stderr  # one input failed
    assert "broken.jpg" in run.stderr
    table = pq.read_table(out).to_pylist()
    kinds = [(row["id"].rsplit("/", 1)[-1], row["kind"]) for row in table]
    assert kinds.count(("axes.png", "view")) == 4 and kinds.count(("axes.png", "pooled")) == 1
    assert kinds.count(("world-rgba.png", "view")) == 4 and ("broken.jpg", "error") in kinds
    pooled = next(row for row in table if row["kind"] == "pooled")
    assert len(pooled["embedding"]) == 32
    assert set(json.loads(pooled["readings"])) == {"urban", "styles"}
    assert "axes.png: urban:" in run.stdout  # the top labels are printed per panorama


def test_demo_runs_offline_on_the_synthetic_street(tiny_dir, tmp_path):
    run = mimetic("demo", str(PANORAMAS / "axes.png"), "--out", str(tmp_path), "--clip-model", f"local-dir:{tiny_dir}")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "synthetic-street.png").is_file()
    rows = pq.read_table(tmp_path / "results.parquet").to_pylist()
    synthetic = [row for row in rows if row["id"] == "synthetic-street"]
    assert len(synthetic) == 9 and "synthetic" in json.loads(synthetic[0]["meta"])["source"]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["clip"]["model"] == f"local-dir:{tiny_dir}"


def test_engine_flags_are_all_on_the_command_line():
    from dataclasses import fields

    from engine.config import EngineConfig

    help_text = mimetic("embed", "--help").stdout
    for spec in fields(EngineConfig):
        flag = spec.name.replace("_", "-")
        assert f"--{flag}" in help_text or f"--no-{flag}" in help_text, flag
