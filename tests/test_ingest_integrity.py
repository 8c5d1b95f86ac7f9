"""``mimetic ingest`` and what it writes, attacked: damaged manifests, a full disk, a read-only folder,
odd metadata, and the integrity of committed parts and of the inputs.

Each case must name the file and the problem in one line, exit non-zero where it is an error, and
lose nothing already committed. The dump and run are those of ``test_ingest_hardening``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.ingest import run as run_module
from engine.ingest.inputs import InputError, RunFolderError, RunMismatchError, RunWriteError, list_inputs, read_metadata
from engine.ingest.job import ingest
from engine.ingest.run import RunFolder, read_run
from engine.models.tiny import make_tiny_clip

from .test_ingest import REPO_ROOT, Crash, assert_same_rows, build_dump, encode, leftovers, snapshot, tiny_engine
from .test_ingest_hardening import (
    SHARD,
    _little_dump,
    cli,
    copy_run,
    edit_manifest,
    files_of,
    ingest_args,
    one_line_error,
)


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


# -- item 8: damaged manifests, a full disk, a read-only folder, odd metadata ---------------------------


def _wrong_shards(m):
    m["shards"] = [m["shards"]["0"]]


def _wrong_files(m):
    m["shards"]["0"]["files"] = "panoramas/part-000000.parquet"


def _wrong_count(m):
    m["shards"]["0"]["panoramas"] = "three"


DAMAGES = {
    "empty": (b"", "the manifest is empty"),
    "truncated": (b'{"format": 1, "config": {', "the manifest is not valid JSON"),
    "not utf-8": (b"\xff\xfe{}", "the manifest is not valid JSON"),
    "a list": (b"[]", "the manifest must be an object, got a list"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "shards a list": (_wrong_shards, "'shards' must be an object, got a list"),
    "files a string": (_wrong_files, "shard 0: 'files' must be a list, got a string"),
    "a count a string": (_wrong_count, "shard 0: 'panoramas' must be a number, got a string"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_manifest_is_refused_naming_it_and_nothing_is_lost(tmp_path, city, engine, damage):
    dump, metadata, reference, _ = city
    run = copy_run(reference, tmp_path)
    content, expected = DAMAGES[damage]
    if callable(content):
        edit_manifest(run, content)
    else:
        (run / "manifest.json").write_bytes(content)
    before = files_of(run)
    with pytest.raises(RunFolderError) as refused:
        ingest(dump, run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert str(refused.value).startswith(f"{run / 'manifest.json'}: ") and expected in str(refused.value)
    assert "new --out folder" in str(refused.value)  # and what to do
    assert files_of(run) == before


def test_the_command_reports_a_corrupt_manifest_in_one_line(tmp_path, city, tiny_clip):
    dump, metadata, reference, _ = city
    run = copy_run(reference, tmp_path)
    (run / "manifest.json").write_text('{"format": 1, "shards": {"0": ')
    before = files_of(run)
    line = one_line_error(cli(*ingest_args(dump, run, metadata, tiny_clip)))
    assert f"{run / 'manifest.json'}: the manifest is not valid JSON" in line
    assert files_of(run) == before


def test_a_full_disk_while_writing_a_part_names_it_and_loses_no_committed_shard(tmp_path, city, engine, monkeypatch):
    dump, metadata, _, expected = city
    out = tmp_path / "run"
    real, calls = run_module.pq.write_table, {"n": 0}

    def disk_full_at_shard_1(table, where, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the listing, shard 0's three parts (one input failed), then shard 1's first
            Path(where).write_bytes(b"PAR1" + b"\0" * 64)  # what got written before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kwargs)

    monkeypatch.setattr(run_module.pq, "write_table", disk_full_at_shard_1)
    with pytest.raises(RunWriteError) as failed:
        ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    monkeypatch.undo()
    assert str(failed.value).startswith(f"{out / 'panoramas' / 'part-000001.parquet'}: cannot write (No space left on device)")
    assert failed.value.errno == errno.ENOSPC and "run the same command again to resume" in str(failed.value)
    assert list(json.loads((out / "manifest.json").read_text())["shards"]) == ["0"]
    assert not list(out.rglob("*.tmp"))  # its temporary file is gone: that is space back

    summary = ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert summary["complete"] and leftovers(out) == []
    assert_same_rows(snapshot(out), expected)


def test_a_full_disk_while_committing_keeps_the_manifest_as_it_was(tmp_path, city, engine, monkeypatch):
    dump, metadata, _, expected = city
    out = tmp_path / "run"
    real, calls = Path.write_text, {"n": 0}

    def disk_full_at_the_second_commit(self, *args, **kwargs):
        if self.name.startswith(".manifest.json."):
            calls["n"] += 1
            if calls["n"] == 3:  # the run's start, shard 0's commit, then shard 1's
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_at_the_second_commit)
    with pytest.raises(RunWriteError, match=r"manifest\.json: cannot write \(No space left on device\)"):
        ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    monkeypatch.undo()
    assert list(json.loads((out / "manifest.json").read_text())["shards"]) == ["0"]
    summary = ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert summary["complete"] and leftovers(out) == []
    assert_same_rows(snapshot(out), expected)


def _can(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(os.geteuid() != 0 or not _can("unshare", "-m", "true"), reason="needs root and mount namespaces")
def test_a_real_full_disk_fails_in_one_line_and_the_run_resumes(tmp_path, city, engine, tiny_clip):
    """A 40 KiB tmpfs, in a mount namespace of its own (it goes away with the command): the run fills it,
    stops with one line, and the folder, copied out, resumes to the uninterrupted run's rows."""
    dump, metadata, _, expected = city
    mount, saved = tmp_path / "small-disk", tmp_path / "saved"
    mount.mkdir()
    args = " ".join(f"'{a}'" for a in ingest_args(dump, mount / "run", metadata, tiny_clip))
    script = (f"mount -t tmpfs -o size=40k tmpfs '{mount}' || exit 99; "
              f"'{sys.executable}' -m engine.cli {args}; status=$?; cp -a '{mount}/run' '{saved}'; exit $status")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO_ROOT, text=True, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    error = [line for line in done.stderr.splitlines() if line.startswith("mimetic ingest: error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(error) == 1 and "No space left on device" in error[0] and f"{mount}/run/" in error[0], done.stderr[-3000:]
    manifest = RunFolder(saved).load_manifest()  # whole and valid: the failed commit never replaced it
    assert manifest["shards"], "the disk filled before the first commit: give the tmpfs more room"
    summary = ingest(dump, saved, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert summary["complete"] and leftovers(saved) == []
    assert_same_rows(snapshot(saved), expected)


def _without_root_powers() -> tuple[str, ...] | None:
    """A prefix that runs a command unable to override file permissions (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")
    return prefix if _can(*prefix, "true") else None


def test_a_read_only_run_folder_is_refused_before_any_work_and_resumes_once_writable(tmp_path, city, engine, tiny_clip,
                                                                                      monkeypatch):
    prefix = _without_root_powers()
    if prefix is None:
        pytest.skip("cannot drop root's permission override here (setpriv)")
    dump, metadata, _, expected = city
    out = tmp_path / "run"
    real_commit = RunFolder.commit

    def die_after_shard_0(self, entry):
        real_commit(self, entry)
        if entry["shard"] == 0:
            raise Crash

    monkeypatch.setattr(RunFolder, "commit", die_after_shard_0)
    with pytest.raises(Crash):
        ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    monkeypatch.undo()
    before = files_of(out)
    out.chmod(0o555)
    try:
        line = one_line_error(cli(*ingest_args(dump, out, metadata, tiny_clip), prefix=prefix))
    finally:
        out.chmod(0o755)
    assert line.startswith(f"mimetic ingest: error: {out}: cannot write the run folder (Permission denied)")
    assert files_of(out) == before
    summary = ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert summary["complete"] and summary["this_invocation"]["panoramas"] == 4  # shards 1 and 2: 6 - 2 good in shard 0
    assert_same_rows(snapshot(out), expected)


def test_a_read_only_parent_folder_is_one_line(tmp_path, city, engine, monkeypatch):
    dump, metadata, _, _ = city

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunWriteError, match=r"new-run: cannot create the run folder \(Permission denied\)"):
        ingest(dump, tmp_path / "new-run", engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)


def test_a_csv_field_over_128_kib_is_read_whole(tmp_path, city, tiny_clip):
    """Python's csv stops at 128 KiB a field by default; metadata (a WKT trace, a description) can be longer."""
    dump, metadata, _, _ = city
    long = "LINESTRING (" + ", ".join(f"2.{k:06d} 48.{k:06d}" for k in range(12000)) + ")"
    assert len(long) > 200 * 1024
    csv_path = tmp_path / "traces.csv"
    csv_path.write_text(f'key,trace,note\nimg000,"{long}","two\nlines"\n')
    rows = read_metadata(csv_path)
    assert rows == [{"key": "img000", "trace": long, "note": "two\nlines"}]  # a quoted line break is kept too

    out = tmp_path / "run"
    done = cli(*ingest_args(dump, out, metadata, tiny_clip, "--metadata", str(csv_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads(snapshot(out)["panoramas"]["seq-a/img000"]["meta"])
    assert meta["trace"] == long and meta["note"] == "two\nlines" and meta["ca"] == "0"


def _nested(depth: int):
    return "[" * depth + "]" * depth


def test_deeply_nested_json_metadata_is_one_line_naming_the_file_and_line(tmp_path, city, tiny_clip):
    dump = city[0]
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text('{"id": "img000", "ok": 1}\n' + '{"id": "img001", "deep": ' + _nested(200_000) + "}\n")
    out = tmp_path / "run"
    line = one_line_error(cli(*ingest_args(dump, out, None, tiny_clip, "--metadata", str(jsonl))))
    assert line == f"mimetic ingest: error: {jsonl}:2: JSON nested too deeply (more than 64 levels)"
    assert not out.exists()  # refused while listing the inputs: nothing written


@pytest.mark.parametrize("depth", [65, 900])  # 900 parses, but every json.dumps of it later would be at Python's limit
def test_json_metadata_nested_over_the_limit_is_refused_wherever_it_comes_from(tmp_path, depth):
    import io
    import tarfile

    document = _nested(depth)
    geojson = tmp_path / "meta.geojson"
    geojson.write_text(document)
    with pytest.raises(InputError, match=r"meta\.geojson: JSON nested too deeply"):
        read_metadata(geojson)
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, blob in (("a.jpg", b"x"), ("a.json", document.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(InputError, match=r"shard\.tar#a\.json: JSON nested too deeply"):
        list_inputs(tar_path)
    fine = tmp_path / "fine.geojson"
    fine.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a", "properties": {"shape": [[[[1, 2]]]]}, "geometry": {"type": "Point", "coordinates": "x"}}]}))
    assert read_metadata(fine) == [{"shape": [[[[1, 2]]]], "id": "a"}]  # 4 levels are fine; a bad point is no point


# -- item 12: integrity of committed parts and of the inputs ---------------------------------------------


def test_every_committed_part_has_its_size_and_sha256_in_the_manifest(city):
    import hashlib

    reference = city[2]
    for entry in json.loads((reference / "manifest.json").read_text())["shards"].values():
        assert sorted(entry["parts"]) == sorted(entry["files"])
        for name, record in entry["parts"].items():
            blob = (reference / name).read_bytes()
            assert record == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def test_a_truncated_part_is_noticed_and_its_shard_redone(tmp_path, city, engine, capsys):
    dump, metadata, reference, expected = city
    run = copy_run(reference, tmp_path)
    part = run / "views" / "part-000001.parquet"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes()[: size // 2])
    with pytest.raises(RunFolderError, match=rf"shard 1: views/part-000001.parquet is {size // 2} bytes, {size} when committed"):
        read_run(run, "views")  # a reader refuses it rather than read half a file

    summary = ingest(dump, run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert f"shard 1: views/part-000001.parquet is {size // 2} bytes, {size} when committed; it will be redone" in capsys.readouterr().err
    assert summary["complete"] and summary["this_invocation"]["panoramas"] + summary["this_invocation"]["quarantined"] == SHARD
    assert part.stat().st_size == size
    assert_same_rows(snapshot(run), expected)


def test_a_flipped_byte_is_caught_by_verify_only(tmp_path, city, engine, capsys):
    dump, metadata, reference, expected = city
    run = copy_run(reference, tmp_path)
    part = run / "panoramas" / "part-000002.parquet"
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0x40  # same size: only the hash can tell
    part.write_bytes(bytes(blob))

    plain = ingest(dump, run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert plain["this_invocation"]["panoramas"] == 0 and "redone" not in capsys.readouterr().err
    verified = ingest(dump, run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True, verify=True)
    err = capsys.readouterr().err
    assert "shard 2: panoramas/part-000002.parquet does not match the sha256 recorded when it was committed; it will be redone" in err
    assert "verified 3 committed shards against their sha256: 1 damaged" in err
    assert verified["complete"] and verified["this_invocation"]["panoramas"] > 0
    assert_same_rows(snapshot(run), expected)
    again = ingest(dump, run, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True, verify=True)
    assert again["this_invocation"]["panoramas"] == 0 and "none damaged" in capsys.readouterr().err


def test_an_input_replaced_under_the_same_name_is_noticed(tmp_path, sources, engine):
    """By size and modification time: the run is refused, naming the input and saying what to do. A
    researcher's run must describe one dump: mixing embeddings of the old and new file would not."""
    dump = _little_dump(tmp_path, sources)
    out = tmp_path / "run"
    ingest(dump, out, engine=engine, shard_size=2, quiet=True)
    replaced = dump / "p1.jpg"
    stat = replaced.stat()
    replaced.write_bytes(encode(sources[0]))  # another panorama, under the same name
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old time: the size differs
    with pytest.raises(RunMismatchError) as refused:
        ingest(dump, out, engine=engine, shard_size=2, quiet=True)
    message = str(refused.value)
    assert "1 replaced (another size or modification time): p1" in message
    assert "Resume with the same dump" in message and "--hash-inputs" in message

    same_size = dump / "p2.jpg"
    replaced.write_bytes(encode(sources[1]))
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # p1 back as it was
    assert ingest(dump, out, engine=engine, shard_size=2, quiet=True)["complete"]
    os.utime(same_size, ns=(same_size.stat().st_atime_ns, same_size.stat().st_mtime_ns + 10**9))  # touched
    with pytest.raises(RunMismatchError, match=r"1 replaced \(another size or modification time\): p2"):
        ingest(dump, out, engine=engine, shard_size=2, quiet=True)


def test_hash_inputs_compares_contents(tmp_path, sources, engine, capsys):
    dump = _little_dump(tmp_path, sources)
    out = tmp_path / "run"
    ingest(dump, out, engine=engine, shard_size=2, quiet=True, hash_inputs=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["compared_by"] == "sha256"
    assert pq.read_table(out / "listing.parquet").column("signature")[0].as_py().startswith("sha256:")
    touched = dump / "p0.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # a copy without its times
    assert ingest(dump, out, engine=engine, shard_size=2, quiet=True)["complete"]  # the run's own way: contents
    assert "compares its inputs by sha256, as when it was started" in capsys.readouterr().err
    blob = bytearray(touched.read_bytes())
    blob[-3] ^= 1
    touched.write_bytes(bytes(blob))
    with pytest.raises(RunMismatchError, match=r"1 replaced \(another content\): p0"):
        ingest(dump, out, engine=engine, shard_size=2, quiet=True, hash_inputs=True)
