"""``mimetic ingest`` on the tiny model: a city dump to a run folder, exactly once, through crashes and kills.

The dump is built from the shared panoramas: 40 yaw-rotated re-encodes (512x256) in two sequence
folders, 3 corrupt files and a Mapillary-style metadata CSV (``key, lon, lat, ca, captured_at, pano``
plus a column of its own).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine import Engine, EngineConfig, Panorama
from engine.ingest import run as run_module
from engine.ingest.inputs import InputError, RunMismatchError, canonical_fields, list_inputs
from engine.ingest.job import ingest
from engine.ingest.run import RunFolder, read_run
from engine.models.tiny import make_tiny_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (512, 256)
GOOD, SHARD = 40, 8


def tiny_engine(clip_model: str) -> Engine:
    """The Engine every ingest test uses (test_query and test_distributed build theirs with this too)."""
    return Engine(EngineConfig(clip_model=clip_model, batch_size=16, top_k=3))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(tiny_clip) -> Engine:
    return tiny_engine(tiny_clip)


def small(array: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(SIZE, Image.Resampling.BILINEAR))


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def build_dump(root: Path, sources: list[np.ndarray], count: int = GOOD) -> tuple[Path, Path, dict]:
    """``count`` rotated re-encodes in two sequence folders, 3 corrupt files, a Mapillary-style CSV.

    Returns (dump folder, metadata CSV, {id: metadata row}).
    """
    dump = root / "dump"
    rows, expected = ["key,lon,lat,ca,captured_at,pano,sequence"], {}
    for k in range(count):
        sequence = "seq-a" if k % 2 == 0 else "seq-b"
        folder = dump / sequence
        folder.mkdir(parents=True, exist_ok=True)
        pano = np.roll(sources[k % len(sources)], k * 13, axis=1)
        key = f"img{k:03d}"
        (folder / f"{key}.jpg").write_bytes(encode(pano))
        row = {"lon": f"{2.33 + k * 1e-3:.4f}", "lat": f"{48.85 + k * 1e-3:.4f}", "ca": f"{(k * 37.5) % 360:g}",
               "captured_at": str(1_556_000_000_000 + k * 60_000), "pano": "1", "sequence": sequence}
        rows.append(",".join([key, *row.values()]))
        expected[f"{sequence}/{key}"] = {"key": key, **row}
    truncated = encode(sources[0])
    (dump / "seq-a" / "broken-truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (dump / "seq-b" / "broken-garbage.png").write_bytes(os.urandom(2048))
    (dump / "seq-b" / "broken-empty.webp").write_bytes(b"")
    rows.append("broken-truncated,2.3,48.8,10,1556000000000,1,seq-a")
    rows.append("not-in-the-dump,2.3,48.8,10,1556000000000,1,seq-x")  # a metadata row without an image
    metadata = root / "mapillary.csv"
    metadata.write_text("\n".join(rows) + "\n")
    return dump, metadata, expected


BROKEN = {"seq-a/broken-truncated", "seq-b/broken-garbage", "seq-b/broken-empty"}


def reference(root: Path, city: tuple, engine: Engine) -> Path:
    """An uninterrupted run of the whole dump: what every other run must reproduce."""
    dump, metadata, _ = city
    ingest(dump, root / "run", engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    return root / "run"


@pytest.fixture(scope="module")
def sources(louvre, jordan_pond) -> list[np.ndarray]:
    return [small(louvre), small(jordan_pond)]


@pytest.fixture(scope="module")
def city(tmp_path_factory, sources):
    return build_dump(tmp_path_factory.mktemp("city"), sources)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, city, engine) -> Path:
    return reference(tmp_path_factory.mktemp("reference"), city, engine)


def snapshot(run: Path) -> dict:
    """Every committed row, keyed so that duplicates would show: panoramas, views, quarantine."""
    panoramas = read_run(run, "panoramas").to_pylist()
    views = read_run(run, "views").to_pylist()
    quarantine = read_run(run, "quarantine").to_pylist()
    for rows, key in ((panoramas, lambda r: r["id"]), (views, lambda r: (r["id"], r["view"])), (quarantine, lambda r: r["id"])):
        keys = [key(r) for r in rows]
        assert len(keys) == len(set(keys)), "a row is duplicated"
    return {
        "panoramas": {r["id"]: r for r in panoramas},
        "views": {(r["id"], r["view"]): r for r in views},
        "quarantine": {r["id"]: r for r in quarantine},
    }


def assert_same_rows(actual: dict, expected: dict) -> None:
    """The same rows: keys, metadata and view specs exactly; embeddings and probabilities to fp16 rounding
    (a panorama embedded in another batch composition may differ in the last bit before rounding)."""
    for table in ("panoramas", "views", "quarantine"):
        assert sorted(actual[table]) == sorted(expected[table]), table
    for table in ("panoramas", "views"):
        for key, row in expected[table].items():
            got = actual[table][key]
            for column, value in row.items():
                if column == "embedding":
                    np.testing.assert_allclose(got[column], value, atol=2e-3, err_msg=f"{table} {key}")
                elif column == "labels":
                    assert [(x["vocabulary"], x["label"]) for x in got[column]] == [(x["vocabulary"], x["label"]) for x in value]
                    np.testing.assert_allclose([x["probability"] for x in got[column]], [x["probability"] for x in value], atol=1e-3)
                elif column not in ("shard",):  # the shard number depends on --shard-size
                    assert got[column] == value, (table, key, column)
    for key, row in expected["quarantine"].items():
        assert actual["quarantine"][key]["reason"] == row["reason"]


def leftovers(run: Path) -> list[str]:
    """Temporary files and parts of shards the manifest does not list."""
    manifest = json.loads((run / "manifest.json").read_text())
    committed = {f for entry in manifest["shards"].values() for f in entry["files"]}
    found = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    found += [p.relative_to(run).as_posix() for t in ("panoramas", "views", "quarantine") for p in (run / t).glob("part-*")
              if p.relative_to(run).as_posix() not in committed]
    return found


# -- an uninterrupted run ----------------------------------------------------------------------------


def test_an_uninterrupted_run_gives_the_expected_rows(reference_run, city, engine):
    dump, _, expected = city
    rows = snapshot(reference_run)
    assert set(rows["panoramas"]) == set(expected) and len(expected) == GOOD
    assert len(rows["views"]) == GOOD * 8
    for pano_id, meta in expected.items():
        row = rows["panoramas"][pano_id]
        assert json.loads(row["meta"]) == meta  # every column kept as given, the unknown "sequence" too
        assert (row["lat"], row["lon"], row["heading"]) == (float(meta["lat"]), float(meta["lon"]), float(meta["ca"]))
        assert row["captured_at"].startswith("2019-04-2") and row["captured_at"].endswith("Z")  # epoch ms -> ISO UTC
        assert row["source"] == str((dump / f"{pano_id}.jpg").resolve())
        assert {label["vocabulary"] for label in row["labels"]} == {"styles", "periods", "urban"}
        for view in range(8):
            v = rows["views"][(pano_id, view)]
            assert v["yaw"] == 45.0 * view and v["pano_yaw"] == 45.0 * view  # no --north-up: cut where the set says
            assert v["bearing"] == pytest.approx((45.0 * view + float(meta["ca"])) % 360, abs=1e-4)
            assert abs(np.linalg.norm(np.asarray(v["embedding"], np.float32)) - 1) < 5e-3
            assert (v["lat"], v["lon"]) == (row["lat"], row["lon"])

    # The stored embeddings are the Engine's own, for the same files.
    some = sorted(expected)[:3]
    direct = engine.embed([Panorama(id=i, data=str(dump / f"{i}.jpg")) for i in some])
    for result in direct:
        stored = np.asarray(rows["panoramas"][result.id]["embedding"], np.float32)
        np.testing.assert_allclose(stored, result.pooled.numpy(), atol=2e-3)
        views = np.asarray([rows["views"][(result.id, k)]["embedding"] for k in range(8)], np.float32)
        np.testing.assert_allclose(views, result.embeddings.numpy(), atol=2e-3)

    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["inputs"] == {**manifest["inputs"], "count": GOOD + 3, "shards": 6}
    assert sorted(manifest["shards"], key=int) == [str(k) for k in range(6)]
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["complete"] and (summary["panoramas"], summary["views"], summary["quarantined"]) == (GOOD, GOOD * 8, 3)
    assert summary["metadata"] == {"rows": GOOD + 2, "rows_without_input": 1, "inputs_without_metadata": 2}
    assert summary["this_invocation"]["views_per_s"] > 0 and summary["this_invocation"]["wall_s"] > 0
    assert leftovers(reference_run) == []


def test_the_quarantine_holds_the_three_corrupt_files_with_their_reasons(reference_run, city):
    dump = city[0]
    quarantine = snapshot(reference_run)["quarantine"]
    assert set(quarantine) == BROKEN
    reasons = {k: row["reason"] for k, row in quarantine.items()}
    assert all(reason.startswith(f"{k}:") for k, reason in reasons.items())  # the reason names the item
    assert "truncated" in reasons["seq-a/broken-truncated"]
    assert "not a recognised image" in reasons["seq-b/broken-garbage"]
    assert "empty" in reasons["seq-b/broken-empty"]
    assert quarantine["seq-b/broken-empty"]["source"] == str((dump / "seq-b" / "broken-empty.webp").resolve())
    assert json.loads(quarantine["seq-a/broken-truncated"]["meta"])["sequence"] == "seq-a"  # metadata kept


def test_the_run_folder_reads_with_plain_arrow_and_describes_itself(reference_run):
    import pyarrow.dataset as ds

    views = ds.dataset(reference_run / "views", format="parquet").to_table()  # temporary dot-files would be skipped
    assert views.num_rows == GOOD * 8
    assert str(views.schema.field("embedding").type.value_type) == "halffloat"
    described = json.loads(pq.read_schema(next((reference_run / "panoramas").glob("part-*.parquet"))).metadata[b"mimetic"])
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert described["table"] == "panoramas" and described["config_hash"] == manifest["config_hash"]
    assert described["embedding_dim"] == 32


def test_a_finished_run_resumes_to_nothing_and_stays_the_same(reference_run, city, engine):
    dump, metadata, _ = city
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("part-*.parquet")}
    summary = ingest(dump, reference_run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert summary["complete"] and summary["this_invocation"]["panoramas"] == 0
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("part-*.parquet")} == before


# -- crashes ------------------------------------------------------------------------------------------


def mimetic(*args: str, **popen) -> subprocess.Popen:
    """``python -m engine.cli ARGS`` from the repo root, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, env=env, text=True, **popen)


def committed(run: Path) -> int:
    try:
        return len(json.loads((run / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_a_run_killed_with_sigkill_then_resumed_gives_exactly_the_same_rows(tmp_path, city, tiny_clip, reference_run):
    dump, metadata, _ = city
    out = tmp_path / "run"
    # Shards of 2 (22 of them), so the kills land mid-run; the reference used shards of 8: the rows must not care.
    args = ["ingest", str(dump), "--out", str(out), "--metadata", str(metadata), "--clip-model", tiny_clip,
            "--batch-size", "16", "--top-k", "3", "--shard-size", "2", "--quiet"]
    for shards_before_kill in (1, 9):
        process = mimetic(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while committed(out) < shards_before_kill and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        assert process.returncode == -signal.SIGKILL, f"finished before the kill ({process.returncode}): {stderr[-2000:]}"
        assert shards_before_kill <= committed(out) < 22
    final = mimetic(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-3000:]
    assert "committed" in stderr and "views/s" in stderr and "ETA" in stderr  # --quiet: plain log lines per shard
    assert "40 panoramas, 320 views, 3 quarantined (22/22 shards)" in stdout
    assert leftovers(out) == []
    assert_same_rows(snapshot(out), snapshot(reference_run))


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way up handles it."""


@pytest.fixture(scope="module")
def little(tmp_path_factory, sources, engine):
    """A 10-input dump (8 good, 2 broken: the broken ones in different shards) and its uninterrupted run."""
    root = tmp_path_factory.mktemp("little")
    dump, metadata, _ = build_dump(root, sources, count=8)
    (dump / "seq-b" / "broken-empty.webp").unlink()
    out = root / "reference"
    ingest(dump, out, engine=engine, metadata=[metadata], shard_size=3, quiet=True)
    return dump, metadata, snapshot(out)


# Every file-system step of starting a run and committing its first two shards: (operation, call number, when).
CRASH_POINTS = [(op, n, when) for op, calls in (("write_table", 5), ("replace", 8)) for n in range(1, calls + 1)
                for when in ("before", "during", "after") if when != "during" or op == "write_table"]


@pytest.mark.parametrize(("op", "n", "when"), CRASH_POINTS)
def test_a_crash_at_any_commit_step_then_resume_gives_exactly_the_same_rows(tmp_path, little, engine, monkeypatch, op, n, when):
    dump, metadata, expected = little
    out = tmp_path / "run"
    real = {"write_table": run_module.pq.write_table, "replace": os.replace}
    calls = {"count": 0}

    def crashing(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] != n:
            return real[op](*args, **kwargs)
        if when == "during":  # half a file under the temporary name, then death
            Path(args[1]).write_bytes(b"PAR1" + os.urandom(100))
            raise Crash
        if when == "after":
            real[op](*args, **kwargs)
        raise Crash

    if op == "write_table":
        monkeypatch.setattr(run_module.pq, "write_table", crashing)
    else:
        monkeypatch.setattr(run_module.os, "replace", crashing)
    with pytest.raises(Crash):
        ingest(dump, out, engine=engine, metadata=[metadata], shard_size=3, quiet=True)
    monkeypatch.undo()

    summary = ingest(dump, out, engine=engine, metadata=[metadata], shard_size=3, quiet=True)
    assert summary["complete"] and leftovers(out) == []
    assert_same_rows(snapshot(out), expected)


# -- refusals -----------------------------------------------------------------------------------------


def test_a_changed_configuration_is_refused_with_what_differs(reference_run, city, tiny_clip, capsys, monkeypatch):
    dump, metadata, _ = city
    files = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}
    with pytest.raises(RunMismatchError) as refused:
        ingest(dump, reference_run, config=EngineConfig(clip_model=tiny_clip, top_k=3, views="ring4"),
               metadata=[metadata], shard_size=SHARD, quiet=True)
    message = str(refused.value)
    assert "refusing to resume" in message and "views:" in message and "top_k" not in message
    with pytest.raises(RunMismatchError, match=r"shard_size: 8 in the run, 4 now"):
        ingest(dump, reference_run, config=EngineConfig(clip_model=tiny_clip, top_k=3), metadata=[metadata], shard_size=4)
    with pytest.raises(RunMismatchError, match=r"north_up: false in the run, true now"):
        ingest(dump, reference_run, config=EngineConfig(clip_model=tiny_clip, top_k=3), metadata=[metadata],
               shard_size=SHARD, north_up=True)

    # --precision auto is recorded as what it resolved to (fp32 here, pinned by the suite): on a CPU where
    # auto means bf16 the run is not resumed with bf16 embeddings beside its fp32 ones.
    assert json.loads((reference_run / "manifest.json").read_text())["config"]["precision"] == "fp32"
    with monkeypatch.context() as patch:
        patch.setenv("MIMETIC_PRECISION", "bf16")
        with pytest.raises(RunMismatchError, match=r"precision: \"?fp32\"? in the run, \"?bf16\"? now"):
            ingest(dump, reference_run, config=EngineConfig(clip_model=tiny_clip, top_k=3), metadata=[metadata], shard_size=SHARD)

    # The command says it and exits with status 2.
    parser = argparse.ArgumentParser()
    from engine.ingest import cli as ingest_cli

    ingest_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ingest", str(dump), "--out", str(reference_run), "--metadata", str(metadata),
                              "--clip-model", tiny_clip, "--top-k", "5", "--shard-size", str(SHARD), "--quiet"])
    assert ingest_cli.run(args) == 2
    assert "top_k: 3 in the run, 5 now" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()} == files  # nothing touched


def test_a_changed_dump_is_refused_with_the_inputs_that_differ(tmp_path, little, engine):
    dump, metadata, _ = little
    out = tmp_path / "run"
    ingest(dump, out, engine=engine, metadata=[metadata], shard_size=3, quiet=True)
    extra = dump / "seq-a" / "zz-new.jpg"
    extra.write_bytes((dump / "seq-a" / "img000.jpg").read_bytes())
    try:
        with pytest.raises(RunMismatchError, match=r"inputs changed \(10 then, 11 now; 1 added: seq-a/zz-new"):
            ingest(dump, out, engine=engine, metadata=[metadata], shard_size=3, quiet=True)
    finally:
        extra.unlink()


def test_a_second_ingest_on_the_same_run_folder_is_refused(tmp_path, little, engine):
    dump, metadata, _ = little
    out = tmp_path / "run"
    with RunFolder(out).lock(), pytest.raises(RunMismatchError, match="another mimetic ingest"):
        ingest(dump, out, engine=engine, metadata=[metadata], shard_size=3, quiet=True)


# -- --north-up -----------------------------------------------------------------------------------------


def test_north_up_points_each_view_at_its_compass_bearing(tmp_path, sources, engine):
    """B is A turned so that its centre column faces east (heading 90), C south-west (225). With
    --north-up the view at yaw v of each must see what A (heading 0) sees at bearing v."""
    base = sources[0]
    width = base.shape[1]
    dump = tmp_path / "dump"
    dump.mkdir()
    headings = {"a": 0.0, "b": 90.0, "c": 225.0}
    for key, heading in headings.items():  # lossless PNG: the turned panoramas hold exactly the same pixels
        turned = np.roll(base, -round(width * heading / 360), axis=1)
        (dump / f"{key}.png").write_bytes(encode(turned, "PNG"))
    (dump / "d.png").write_bytes(encode(base, "PNG"))  # no heading in the metadata
    metadata = tmp_path / "meta.jsonl"
    metadata.write_text("".join(json.dumps({"id": k, "computed_compass_angle": h}) + "\n" for k, h in headings.items()))

    ingest(dump, tmp_path / "north", engine=engine, metadata=[metadata], shard_size=8, north_up=True, quiet=True)
    rows = snapshot(tmp_path / "north")
    views = lambda k: np.asarray([rows["views"][(k, v)]["embedding"] for v in range(8)], np.float32)  # noqa: E731
    for key, heading in headings.items():
        np.testing.assert_allclose(views(key), views("a"), atol=2e-3, err_msg=key)
        for v in range(8):
            row = rows["views"][(key, v)]
            assert row["bearing"] == 45.0 * v and row["pano_yaw"] == pytest.approx((45.0 * v - heading) % 360)
        assert rows["panoramas"][key]["yaw_offset"] == -heading
    assert set(rows["quarantine"]) == {"d"} and "no heading" in rows["quarantine"]["d"]["reason"]

    # Without --north-up the views stay where the set says, and carry their bearing: B's view at yaw 0 looks east.
    ingest(dump, tmp_path / "plain", engine=engine, metadata=[metadata], shard_size=8, quiet=True)
    plain = snapshot(tmp_path / "plain")
    b0 = plain["views"][("b", 0)]
    assert b0["bearing"] == 90.0 and b0["pano_yaw"] == 0.0
    np.testing.assert_allclose(b0["embedding"], rows["views"][("a", 2)]["embedding"], atol=2e-3)  # A at bearing 90
    assert plain["views"][("d", 0)]["bearing"] is None
    plain_views = lambda k: np.asarray([plain["views"][(k, v)]["embedding"] for v in range(8)], np.float32)  # noqa: E731
    assert not np.allclose(plain_views("b"), plain_views("c"), atol=2e-2)  # it is the turn that made them alike


# -- inputs ------------------------------------------------------------------------------------------


def test_webdataset_tars_listing_files_and_metadata_formats(tmp_path, sources, engine):
    jpeg, png = encode(sources[0]), encode(sources[1], "PNG")
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, blob in [("s/0001.jpg", jpeg), ("s/0001.json", json.dumps({"lat": 41.9, "lon": 12.5, "compass_angle": 30}).encode()),
                           ("s/0002.png", png), ("s/0002.json", b'{"heading": -90, "note": "kept"}'), ("s/0003.jpg", b"corrupt")]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    listing = list_inputs(tar_path)
    assert [i.id for i in listing.items] == ["s/0001", "s/0002", "s/0003"]
    first, second, _ = listing.items
    assert first.read() == jpeg and second.read() == png  # read back by offset, not by unpacking
    assert canonical_fields(first.meta) == {"lat": 41.9, "lon": 12.5, "heading": 30.0, "captured_at": None}
    assert canonical_fields(second.meta)["heading"] == 270.0 and second.meta["note"] == "kept"

    summary = ingest(tar_path, tmp_path / "tar-run", engine=engine, shard_size=2, quiet=True)
    assert (summary["panoramas"], summary["quarantined"]) == (2, 1)
    rows = snapshot(tmp_path / "tar-run")
    assert rows["panoramas"]["s/0001"]["source"] == f"{tar_path}#s/0001.jpg"
    assert rows["quarantine"]["s/0003"]["reason"].startswith("s/0003: ")

    # A listing file: paths relative to it, a .tar among them, one file missing (it goes to the quarantine).
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(jpeg)
    (folder / "x.png").write_bytes(png)
    assert [i.id for i in list_inputs(folder).items] == ["x.jpg", "x.png"]  # one stem, two files: extensions kept
    listing_file = tmp_path / "list.txt"
    listing_file.write_text(f"# panoramas\nfiles/x.jpg\n{folder / 'x.png'}\n\nfiles/missing.jpg\nshard-000.tar\n")
    ids = [i.id for i in list_inputs(listing_file).items]
    assert ids == sorted(["files/x", f"{str(folder).lstrip('/')}/x", "files/missing", "s/0001", "s/0002", "s/0003"])
    # GeoJSON keyed by file name: the point gives lat/lon; Mapillary's API fields give heading and time.
    geojson = tmp_path / "meta.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [12.49, 41.89]},
         "properties": {"filename": "missing.jpg", "computed_compass_angle": 12.5, "captured_at": 1556000000000}}]}))
    missing = next(i for i in list_inputs(listing_file, [geojson]).items if i.id == "files/missing")
    assert canonical_fields(missing.meta) == {"lat": 41.89, "lon": 12.49, "heading": 12.5, "captured_at": "2019-04-23T06:13:20Z"}
    summary = ingest(listing_file, tmp_path / "list-run", engine=engine, metadata=[geojson], shard_size=4, quiet=True)
    quarantine = snapshot(tmp_path / "list-run")["quarantine"]
    assert set(quarantine) == {"files/missing", "s/0003"} and "cannot read the file" in quarantine["files/missing"]["reason"]

    with pytest.raises(InputError, match="no images"):
        list_inputs(_empty(tmp_path))
    with pytest.raises(InputError, match="neither an image"):
        bad = tmp_path / "bad-list.txt"
        bad.write_text("notes.docx\n")
        list_inputs(bad)


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no panoramas here")
    return folder


def test_the_progress_bar_shows_panoramas_views_per_second_and_errors(tmp_path, little, engine, capsys):
    dump, metadata, _ = little
    ingest(dump, tmp_path / "run", engine=engine, metadata=[metadata], shard_size=3)
    err = capsys.readouterr().err
    assert "pano/s" in err and "views/s" in err and "2 errors" in err and "10/10" in err


def test_random_weights_are_the_same_in_every_process(tmp_path, caplog):
    """--random-weights is seeded, so a resumed run, a Ray actor and a query all see one model; the seed
    is in the run's fingerprint, since another seed is another model."""
    from engine.ingest.run import config_fingerprint

    config = EngineConfig(clip_model="ViT-B-32", random_weights=True, vocabularies=(), device="cpu")
    first = Engine(config).embed_text(["a street"])
    torch.manual_seed(1234)  # whatever the process did before
    second = Engine(config).embed_text(["a street"])
    assert torch.equal(first, second)
    assert caplog.text.count("RANDOM") >= 2  # said every time
    fingerprint = lambda c: config_fingerprint(c, north_up=False, shard_size=8)  # noqa: E731
    assert fingerprint(config) != fingerprint(EngineConfig(**{**config.__dict__, "seed": 1}))
    trained = EngineConfig(clip_model="ViT-B-32", vocabularies=())
    assert fingerprint(trained) == fingerprint(EngineConfig(**{**trained.__dict__, "seed": 1}))  # unused there
