"""``mimetic ingest --engine ray``: the same rows, manifest, quarantine and resume on a local Ray (2 CPUs)."""

from __future__ import annotations

import json
import os

import pytest

from engine import ingest as ingest_module
from engine.config import EngineConfig
from engine.ingest import ingest
from engine.models.tiny import make_tiny_clip

from .test_ingest import SHARD, Crash, assert_same_rows, build_dump, leftovers, reference, small, snapshot, tiny_engine

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


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_ray_run_resuming_a_crashed_local_run_gives_the_local_rows(tmp_path, setting, tiny_clip, local_ray, monkeypatch):
    """A local run dies after shard 1's parts are renamed but before the manifest lists it (the worst
    moment); Ray then resumes it with two actors: shards done locally stay, the rest are done once,
    the 3 corrupt files land in the quarantine, and the rows are the uninterrupted local run's."""
    from engine.distributed import ingest_ray

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
    from engine.distributed import plan_actors

    config = EngineConfig()
    assert plan_actors(config, {"CPU": 64.0, "GPU": 8.0}, None) == (8, 8.0, 1.0)
    assert plan_actors(config, {"CPU": 2.0}, None) == (1, 2.0, 0.0)
    assert plan_actors(config, {"CPU": 16.0}, 2) == (2, 8.0, 0.0)
    assert plan_actors(EngineConfig(device="cpu"), {"CPU": 16.0, "GPU": 2.0}, None) == (4, 4.0, 0.0)
    assert os.cpu_count()  # the local default comes from here when Ray reports no CPUs
