"""``mimetic models make-tiny``, ``mimetic embed`` and ``mimetic demo``, run as a user runs them."""

import json

import pyarrow.parquet as pq
import pytest

from engine import cli

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
    assert {entry["vocabulary"] for entry in pooled["labels"]} == {"urban", "styles"}
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


# The engine's flags as users type them (README, scripts): a field renamed or dropped must show up here.
ENGINE_FLAGS = (
    "--views", "--clip-model", "--clip-weights", "--random-weights", "--device", "--attention", "--batch-size", "--compile",
    "--vocabularies", "--top-k", "--no-antialias", "--decode-workers", "--max-pixels", "--max-decode-mib", "--seed",
    "--precision",
)


def test_engine_flags_are_all_on_the_command_line():
    from engine.config import EngineConfig

    assert set(ENGINE_FLAGS) <= set(_options(_command("embed")))
    assert "--no-antialias" in mimetic("embed", "--help").stdout
    # Unset, they give the library's defaults; set, each reaches its field.
    parser = cli.build_parser()
    assert cli.config_from_args(parser.parse_args(["embed", "p.jpg", "--out", "r.parquet"])) == EngineConfig()
    given = parser.parse_args([
        "embed", "p.jpg", "--out", "r.parquet", "--views", "cube6", "--clip-model", "local-dir:m", "--clip-weights", "w.bin",
        "--random-weights", "--device", "cpu", "--attention", "sdpa", "--batch-size", "7", "--compile", "--vocabularies",
        "styles, urban", "--top-k", "2", "--no-antialias", "--decode-workers", "3", "--max-pixels", "1000",
        "--max-decode-mib", "64", "--seed", "9", "--precision", "bf16",
    ])
    assert cli.config_from_args(given) == EngineConfig(
        views="cube6", clip_model="local-dir:m", clip_weights="w.bin", random_weights=True, device="cpu", attention="sdpa",
        batch_size=7, compile=True, vocabularies=("styles", "urban"), top_k=2, antialias=False, decode_workers=3,
        max_pixels=1000, max_decode_mib=64, seed=9, precision="bf16",
    )


def _command(name: str):
    """The argparse parser of ``mimetic NAME`` (in-process: building it loads no model)."""
    import argparse

    from engine import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _options(parser) -> dict:
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("command", ["embed", "demo", "serve", "ingest", "dream", "loop"])
def test_every_engine_flag_says_what_it_does(command):
    from dataclasses import fields

    from engine.config import EngineConfig

    options = _options(_command(command))
    for spec in fields(EngineConfig):
        flag = "--" + spec.name.replace("_", "-")
        action = options.get(flag) or options.get("--no-" + spec.name.replace("_", "-"))
        assert action is not None, (command, flag)
        assert action.help and len(action.help.split()) >= 3, (command, flag, action.help)
    assert all(name in options["--views"].help for name in ("ring8", "ring4", "cube6", "gsv6"))
    assert "(default ring8)" in options["--views"].help and "(default 256)" in options["--batch-size"].help


def test_stable_diffusion_flags_only_where_they_do_something():
    for command in ("embed", "demo", "ingest"):
        options = _options(_command(command))
        assert "--sd-model" not in options and "--sd-batch-size" not in options, command
    serve = _options(_command("serve"))  # it serves Dream with the model; its batches are the server's own
    assert serve["--sd-model"].help and "--sd-batch-size" not in serve
    for command in ("dream", "walk", "loop"):
        options = _options(_command(command))
        assert options["--sd-model"].help and options["--sd-batch-size"].help, command
    # A walk runs no CLIP: its engine flags are the ones the diffusion model uses.
    assert "--clip-model" not in _options(_command("walk")) and "--device" in _options(_command("walk"))


def test_the_random_weights_warning_is_one_plain_line(tiny_dir, tmp_path):
    run = mimetic("demo", "--out", str(tmp_path), "--clip-model", f"local-dir:{tiny_dir}", "--random-weights", "--views", "ring4")
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("RANDOM, UNTRAINED weights") == 1, run.stderr
    assert "RuntimeWarning" not in run.stderr and "warnings.warn" not in run.stderr
    [line] = [line for line in run.stderr.splitlines() if "RANDOM" in line]
    assert line.startswith("CLIP local-dir:") and "MEANINGLESS" in line


def test_a_random_weights_demo_is_reproducible(tiny_dir, tmp_path):
    """Two runs give the same embeddings (the seed is fixed, 0 by default) and info.json records it."""
    tables = []
    for name in ("a", "b"):
        run = mimetic("demo", "--out", str(tmp_path / name), "--clip-model", f"local-dir:{tiny_dir}", "--random-weights", "--views", "ring4")
        assert run.returncode == 0, run.stderr
        tables.append(pq.read_table(tmp_path / name / "results.parquet").to_pylist())
        info = json.loads((tmp_path / name / "info.json").read_text())
        assert info["clip"]["weights"] == "RANDOM (untrained, seed 0)"
    embeddings = [[row["embedding"] for row in table if row["kind"] != "error"] for table in tables]
    assert len(embeddings[0]) == 5 and embeddings[0] == embeddings[1]  # the synthetic street: 4 views and the pooled row
