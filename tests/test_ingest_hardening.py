"""``mimetic ingest`` attacked from outside: crafted manifests, a link for a table folder, runs that
committed nothing, inputs without a heading, the decode budget flag and the summary's rates. Damaged
manifests, a full disk, odd metadata and the integrity checks are in ``test_ingest_integrity``.

Each case must name the file and the problem in one line, exit non-zero where it is an error, and
lose nothing already committed. The dump is the one of ``test_ingest`` (re-encodes of the shared
panoramas, 3 corrupt files, a Mapillary-style CSV), smaller: 6 good inputs in shards of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import EngineConfig
from engine.ingest import cli as ingest_cli
from engine.ingest.inputs import RunFolderError, RunMismatchError
from engine.ingest.job import ingest
from engine.ingest.run import RunFolder, config_fingerprint, read_run
from engine.models.tiny import make_tiny_clip

from .test_ingest import REPO_ROOT, assert_same_rows, build_dump, encode, leftovers, snapshot, tiny_engine

SHARD = 3


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(tiny_clip):
    return tiny_engine(tiny_clip)


@pytest.fixture(scope="module")
def sources(louvre, jordan_pond):
    from .test_ingest import small

    return [small(louvre), small(jordan_pond)]


@pytest.fixture(scope="module")
def city(tmp_path_factory, sources, engine):
    """(dump, metadata CSV, the uninterrupted run's folder, its rows): 9 inputs, 3 shards."""
    root = tmp_path_factory.mktemp("hardening")
    dump, metadata, _ = build_dump(root, sources, count=6)
    reference = root / "reference"
    ingest(dump, reference, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    return dump, metadata, reference, snapshot(reference)


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_manifest(run: Path, change) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    change(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))


def cli(*args: str, timeout: float = 300, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m engine.cli ARGS`` from the repo root, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([*prefix, sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def ingest_args(dump: Path, out: Path, metadata: Path | None, tiny_clip: str, *more: str) -> list[str]:
    return ["ingest", str(dump), "--out", str(out), *(["--metadata", str(metadata)] if metadata else []),
            "--clip-model", tiny_clip, "--batch-size", "16", "--top-k", "3", "--shard-size", str(SHARD), "--quiet", *more]


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single line a user's mistake gets: status 2, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mimetic ingest: error: "), done.stderr[-3000:]
    return lines[0]


def _little_dump(tmp_path: Path, sources) -> Path:
    dump = tmp_path / "dump"
    dump.mkdir()
    for k in range(3):
        (dump / f"p{k}.jpg").write_bytes(encode(sources[k % 2]))
    return dump


# -- item 4: every path a manifest names stays inside the run folder -----------------------------------


@pytest.mark.parametrize("crafted", ["../victim.txt", "ABSOLUTE", "panoramas/../../victim.txt", "manifest.json", "SYMLINK"])
def test_a_manifest_naming_a_path_outside_its_own_parts_is_refused_and_nothing_is_touched(tmp_path, city, engine, crafted):
    """Shard 1's entry lists the crafted path beside a part that went missing: the old resume took the
    shard for lost and unlinked every path it listed, the victim outside the run folder included."""
    dump, metadata, reference, _ = city
    run = copy_run(reference, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("a researcher's notes")
    (run / "views" / "part-000001.parquet").unlink()  # so the old code took shard 1 for lost
    if crafted == "SYMLINK":  # the entry is as written, but its part is a link out of the run folder
        (run / "panoramas" / "part-000001.parquet").unlink()
        (run / "panoramas" / "part-000001.parquet").symlink_to(victim)
        name = "panoramas/part-000001.parquet"
    else:
        name = str(victim) if crafted == "ABSOLUTE" else crafted
        edit_manifest(run, lambda m: m["shards"]["1"]["files"].insert(0, name))
    before = files_of(run)

    with pytest.raises(RunFolderError) as refused:
        ingest(dump, run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    message = str(refused.value)
    assert str(run / "manifest.json") in message and "shard 1" in message and name in message
    assert "refusing to touch it" in message
    assert victim.read_text() == "a researcher's notes"
    assert files_of(run) == before  # nothing deleted, nothing written, in the run folder either
    with pytest.raises(RunFolderError):  # query and every other reader refuse it too
        read_run(run)


def test_the_command_refuses_a_traversing_manifest_in_one_line(tmp_path, city, tiny_clip):
    dump, metadata, reference, _ = city
    run = copy_run(reference, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / "views" / "part-000001.parquet").unlink()
    edit_manifest(run, lambda m: m["shards"]["1"]["files"].append("../victim.txt"))
    line = one_line_error(cli(*ingest_args(dump, run, metadata, tiny_clip)))
    assert "manifest.json: shard 1 lists '../victim.txt'" in line
    assert victim.read_text() == "keep me"


def test_a_table_folder_that_is_a_link_is_refused(tmp_path, sources, engine):
    """No input failed, so no shard lists a quarantine part; the old resume deleted every part-*.parquet
    in the folder the link led to, as parts of shards not committed."""
    dump = _little_dump(tmp_path, sources)
    run = tmp_path / "run"
    ingest(dump, run, engine=engine, shard_size=2, quiet=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-000009.parquet").write_bytes(b"not the run's")
    (run / "quarantine").rmdir()
    (run / "quarantine").symlink_to(elsewhere)
    with pytest.raises(RunFolderError, match="quarantine: not a folder of the run but a link or a file: refusing to touch it"):
        ingest(dump, run, engine=engine, shard_size=2, quiet=True)
    assert (elsewhere / "part-000009.parquet").read_bytes() == b"not the run's"


# -- item 9: a run that committed nothing does not lock its folder ---------------------------------------


def test_a_run_that_failed_before_any_work_can_be_restarted_with_other_settings(tmp_path, city, tiny_clip, engine, capsys):
    dump, metadata, _, expected = city
    out = tmp_path / "run"
    with pytest.raises((ValueError, OSError)):  # a model that is not there: the run folder is already started
        ingest(dump, out, config=EngineConfig(clip_model=f"{tiny_clip}-typo", batch_size=16, top_k=3),
               metadata=[metadata], shard_size=SHARD, quiet=True)
    assert (out / "manifest.json").exists() and (out / "listing.parquet").exists()
    capsys.readouterr()

    summary = ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    err = capsys.readouterr().err
    assert "has no committed shard yet: starting it again with the new settings" in err and "clip_model" in err
    assert summary["complete"]
    assert_same_rows(snapshot(out), expected)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["clip_model"] == tiny_clip

    # Once a shard is committed the settings are the run's: another one is refused, as before.
    with pytest.raises(RunMismatchError, match="top_k: 3 in the run, 4 now"):
        ingest(dump, out, config=EngineConfig(clip_model=tiny_clip, top_k=4), metadata=[metadata], shard_size=SHARD, quiet=True)


def test_a_run_that_committed_nothing_restarts_with_another_dump_too(tmp_path, city, engine, sources, capsys):
    dump, metadata, _, _ = city
    out = tmp_path / "run"
    with RunFolder(out).lock() as run:  # a run started on the wrong dump, killed before its first commit
        from engine.ingest.job import prepare

        other = tmp_path / "other"
        other.mkdir()
        (other / "x.jpg").write_bytes(encode(sources[0]))
        _, listing, fingerprint = prepare(other, out, config=engine.config, shard_size=SHARD)
        run.open(listing, fingerprint, dump=str(other), engine_config=engine.config)
    (out / "views" / "part-000000.parquet").write_bytes(b"an uncommitted part of the killed attempt")
    summary = ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    err = capsys.readouterr().err
    assert "has no committed shard yet: starting it again" in err and "its inputs changed (1 then, 9 now" in err
    assert "1 removed: x" in err
    assert summary["complete"] and summary["inputs"] == 9 and leftovers(out) == []


# -- item 10: --north-up without headings ---------------------------------------------------------------


@pytest.mark.parametrize("with_heading", [(), ("a",)])
def test_north_up_quarantines_every_input_without_a_heading(tmp_path, sources, engine, with_heading):
    """None with a heading (the generator used to end under the consumer: "generator raised
    StopIteration"), or only the first: the inputs after it fail early, after the Engine is done."""
    dump = tmp_path / "dump"
    dump.mkdir()
    for key in "abcd":
        (dump / f"{key}.png").write_bytes(encode(sources[0], "PNG"))
    metadata = tmp_path / "meta.jsonl"
    metadata.write_text("".join(json.dumps({"id": k, "heading": 90}) + "\n" for k in with_heading) or "\n")
    summary = ingest(dump, tmp_path / "run", engine=engine, metadata=[metadata], shard_size=8, north_up=True, quiet=True)
    assert summary["complete"] and summary["panoramas"] == len(with_heading)
    quarantine = snapshot(tmp_path / "run")["quarantine"]
    assert set(quarantine) == set("abcd") - set(with_heading)
    for key, row in quarantine.items():
        assert row["reason"].startswith(f"{key}: no heading in the metadata (needed by --north-up; columns read: heading,")


# -- items 2 and 19: the decode budget flag, and two named rates -----------------------------------------


def _ingest_command(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    ingest_cli.add_parsers(parser.add_subparsers(dest="command"))
    status = ingest_cli.run(parser.parse_args(["ingest", *argv]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_max_decode_mib_reaches_the_engine_is_recorded_and_does_not_lock_the_run(tmp_path, sources, tiny_clip, capsys):
    """The decoded-bytes budget changes how much memory, not what a shard holds: recorded with the
    Engine's settings, left out of the fingerprint, so a resume may use another one."""
    dump = _little_dump(tmp_path, sources)
    out = tmp_path / "run"
    flags = [str(dump), "--out", str(out), "--clip-model", tiny_clip, "--batch-size", "16", "--shard-size", "2", "--quiet"]
    status, _, err = _ingest_command(capsys, *flags, "--max-decode-mib", "64")
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine_config"]["max_decode_mib"] == 64
    assert "max_decode_mib" not in manifest["config"]
    assert config_fingerprint(EngineConfig(max_decode_mib=64), north_up=False, shard_size=2) == \
        config_fingerprint(EngineConfig(max_decode_mib=4096), north_up=False, shard_size=2)
    (out / "views" / "part-000001.parquet").unlink()  # shard 1 to redo, under another budget
    status, _, err = _ingest_command(capsys, *flags, "--max-decode-mib", "128")
    assert status == 0 and "refusing" not in err and "shard 1: views/part-000001.parquet is missing" in err


def test_the_summary_names_the_embedding_rate_and_the_wall_rate(tmp_path, sources, tiny_clip, capsys):
    dump = _little_dump(tmp_path, sources)
    out = tmp_path / "run"
    status, stdout, _ = _ingest_command(capsys, str(dump), "--out", str(out), "--clip-model", tiny_clip,
                                        "--batch-size", "16", "--shard-size", "2", "--quiet")
    assert status == 0
    now = json.loads((out / "summary.json").read_text())["this_invocation"]
    assert 0 < now["embedding_s"] < now["wall_s"]  # the model was loaded in between
    # The seconds are rounded to the millisecond; the rates are not.
    assert now["embedding_panoramas_per_s"] == pytest.approx(3 / now["embedding_s"], rel=0.0006 / now["embedding_s"])
    assert now["panoramas_per_s"] == pytest.approx(3 / now["wall_s"], rel=0.0006 / now["wall_s"])
    assert now["embedding_panoramas_per_s"] > now["panoramas_per_s"]
    assert now["embedding_views_per_s"] == pytest.approx(8 * now["embedding_panoramas_per_s"], rel=1e-6)
    assert (f"embedding: {now['embedding_panoramas_per_s']:.2f} panoramas/s" in stdout
            and f"wall, including model loading: {now['panoramas_per_s']:.2f} panoramas/s" in stdout), stdout
