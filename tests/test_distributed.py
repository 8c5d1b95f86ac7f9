"""``mimetic ingest --engine ray``: the same rows, manifest, quarantine and resume on a local Ray (2 CPUs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from engine.config import EngineConfig
from engine.ingest import job as ingest_module
from engine.ingest.job import ingest
from engine.models.tiny import make_tiny_clip

from .test_ingest import (
    REPO_ROOT,
    SHARD,
    Crash,
    assert_same_rows,
    build_dump,
    leftovers,
    reference,
    small,
    snapshot,
    tiny_engine,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, about its own settings

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[data]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def setting(tmp_path_factory, louvre, jordan_pond, tiny_clip):
    """The city dump, the local Engine, and its uninterrupted local run."""
    engine = tiny_engine(tiny_clip)
    city = build_dump(tmp_path_factory.mktemp("city"), [small(louvre), small(jordan_pond)])
    return city, engine, reference(tmp_path_factory.mktemp("reference"), city, engine)


def test_a_successful_ray_run_prints_no_error_and_no_token_notice(tmp_path, louvre, tiny_clip):
    """A new local cluster, as a user's first ``--engine ray`` run starts it (first in this file, before
    this process starts its own Ray): Ray core's, Ray Data's and the C++ driver's lines stay below
    warning level or are not printed, so stderr holds our progress and nothing that reads as a failure."""
    dump, metadata, _ = build_dump(tmp_path, [small(louvre)], count=3)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "ingest", str(dump), "--out", str(tmp_path / "run"), "--metadata", str(metadata),
         "--engine", "ray", "--address", "local", "--actors", "1", "--clip-model", tiny_clip, "--batch-size", "16",
         "--top-k", "3", "--shard-size", "3"],
        cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 panoramas, 24 views, 3 quarantined (2/2 shards)" in done.stdout
    for line in re.split(r"[\r\n]+", done.stderr):
        assert not re.search(r"\bERROR\b|\] E \d|Traceback", line), line  # Python's ERROR, C++'s "E", a traceback
        assert not re.search(r"\bINFO\b|\] I \d", line), line  # Ray's info lines: only with --verbose
        assert "Token authentication" not in line and "Progress bars disabled" not in line, line
    assert "ingest (ray)" in done.stderr  # the progress bar is ours, and it is there


def test_the_actors_engines_get_the_decode_budget_from_the_config(tmp_path, tiny_clip):
    """--max-decode-mib reaches each actor in its EngineConfig: its Engine's budget is that size."""
    from engine.ingest.ray import ShardWorker

    config = EngineConfig(clip_model=tiny_clip, batch_size=16, top_k=3, max_decode_mib=96)
    worker = ShardWorker(config, str(tmp_path), north_up=False, context={}, threads=None)
    assert worker.engine.decode_budget.limit == 96 * 2**20


def test_shards_that_failed_as_a_whole_are_tried_once_more(tmp_path, setting, tiny_clip, local_ray, monkeypatch, capsys):
    """The first pass loses shards 2 and 4 (an actor lost: Ray does not restart them, max_restarts=0); the
    second pass, on a new pool, gets exactly those, and the run ends complete with the local rows."""
    from engine.ingest import ray as distributed
    from engine.ingest.job import build_shard, embed_in_order, shard_items
    from engine.ingest.ray import ingest_ray

    (dump, metadata, _), engine, reference_run = setting
    passes = []

    def fake_pass(ray, run, rows, config, north_up, actors, progress, captions=None):  # the pool's work, done here
        shards = [row["shard"] for row in rows]
        passes.append(shards)
        listing = ingest_module.list_inputs(dump, [metadata])
        for shard in shards:
            if len(passes) == 1 and shard in (2, 4):
                continue
            outcomes = list(embed_in_order(engine, shard_items(listing, run, shard), north_up))
            run.commit(build_shard(run, shard, outcomes, north_up=north_up, context=run.table_context(), seconds=0.0))

    monkeypatch.setattr(distributed, "_run_shards", fake_pass)
    config = EngineConfig(clip_model=tiny_clip, batch_size=16, top_k=3)
    summary = ingest_ray(dump, tmp_path / "run", config=config, metadata=[metadata], shard_size=SHARD, quiet=True)
    assert passes == [[0, 1, 2, 3, 4, 5], [2, 4]]
    assert "2 shards failed as a whole (2, 4); trying them once more" in capsys.readouterr().err
    assert summary["complete"]
    assert_same_rows(snapshot(tmp_path / "run"), snapshot(reference_run))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_ray_run_resuming_a_crashed_local_run_gives_the_local_rows(tmp_path, setting, tiny_clip, local_ray, monkeypatch):
    """A local run dies after shard 1's parts are renamed but before the manifest lists it (the worst
    moment); Ray then resumes it with two actors: shards done locally stay, the rest are done once,
    the 3 corrupt files land in the quarantine, and the rows are the uninterrupted local run's."""
    from engine.ingest.ray import ingest_ray

    (dump, metadata, _), engine, reference_run = setting
    out = tmp_path / "run"
    real_commit = ingest_module.RunFolder.commit

    def commit_then_die(self, entry):
        if entry["shard"] == 1:
            raise Crash
        real_commit(self, entry)

    monkeypatch.setattr(ingest_module.RunFolder, "commit", commit_then_die)
    with pytest.raises(Crash):
        ingest(dump, out, engine=engine, metadata=[metadata], shard_size=SHARD, quiet=True)
    monkeypatch.undo()
    assert sorted(leftovers(out)) == ["panoramas/part-000001.parquet", "views/part-000001.parquet"]  # not committed
    done_locally = json.loads((out / "manifest.json").read_text())["shards"]
    assert list(done_locally) == ["0"]

    config = EngineConfig(clip_model=tiny_clip, batch_size=16, top_k=3)  # the local run's settings
    summary = ingest_ray(dump, out, config=config, metadata=[metadata], shard_size=SHARD, quiet=True, actors=2)
    assert summary["complete"] and summary["engine"] == "ray"
    assert (summary["panoramas"], summary["views"], summary["quarantined"]) == (40, 320, 3)
    assert summary["this_invocation"]["panoramas"] + done_locally["0"]["panoramas"] == 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"]["0"] == done_locally["0"]  # not redone
    assert sorted(manifest["shards"], key=int) == [str(k) for k in range(6)]
    assert leftovers(out) == []
    assert_same_rows(snapshot(out), snapshot(reference_run))


def test_plan_actors_gives_one_gpu_per_actor_and_splits_cpus():
    from engine.ingest.ray import plan_actors

    config = EngineConfig()
    assert plan_actors(config, {"CPU": 64.0, "GPU": 8.0}, None) == (8, 8.0, 1.0)
    assert plan_actors(config, {"CPU": 2.0}, None) == (1, 2.0, 0.0)
    assert plan_actors(config, {"CPU": 16.0}, 2) == (2, 8.0, 0.0)
    assert plan_actors(EngineConfig(device="cpu"), {"CPU": 16.0, "GPU": 2.0}, None) == (4, 4.0, 0.0)

def test_plan_actors_counts_the_machines_cpus_when_ray_reports_none(monkeypatch):
    from engine.ingest import ray as distributed

    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 12)
    assert distributed.plan_actors(EngineConfig(), {}, None) == (3, 4.0, 0.0)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: None)  # os.cpu_count() may not know
    assert distributed.plan_actors(EngineConfig(), {}, None) == (1, 1.0, 0.0)


def test_a_ray_run_with_captions_gives_the_local_run_s_captions(tmp_path, louvre, jordan_pond, tiny_clip, local_ray):
    """--captions on Ray: each actor loads its own captioner beside its Engine, and the views table holds the same
    captions and interrogator prompts as a local run of the same dump."""
    from PIL import Image

    from engine.config import CaptionSettings
    from engine.ingest.ray import ingest_ray
    from engine.ingest.run import read_run
    from engine.models.tiny_caption import make_tiny_caption

    dump = tmp_path / "dump"
    dump.mkdir()
    for name, pano in (("louvre", louvre), ("pond", jordan_pond)):
        Image.fromarray(pano).resize((512, 256), Image.Resampling.BILINEAR).save(dump / f"{name}.jpg", quality=90)
    config = EngineConfig(clip_model=tiny_clip, views="ring4", batch_size=16, top_k=2, vocabularies=("styles",))
    captions = CaptionSettings(str(make_tiny_caption(tmp_path / "models")), beams=1, max_tokens=6, flavours=("mediums",))
    local = ingest(dump, tmp_path / "local", config=config, quiet=True, captions=captions, shard_size=1)
    remote = ingest_ray(dump, tmp_path / "ray", config=config, quiet=True, captions=captions, shard_size=1, actors=2)
    assert local["complete"] and remote["complete"] and remote["panoramas"] == 2
    rows = {name: sorted((r["id"], r["view"], r["caption"], r["prompt"]) for r in read_run(tmp_path / name, "views").to_pylist())
            for name in ("local", "ray")}
    assert rows["ray"] == rows["local"] and len(rows["ray"]) == 8
    assert all(caption is not None and prompt for _, _, caption, prompt in rows["ray"])
