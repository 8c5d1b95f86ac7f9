"""The ``mimetic`` command, run as a subprocess the way a user runs it, and in-process for the cheap cases."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
RING8_NAMES = [f"{i}_y{yaw}_p0.png" for i, yaw in enumerate(range(0, 360, 45))]


def mimetic(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m engine.cli ARGS`` from the repo root, importable whether or not it is pip-installed;
    ``env`` adds variables to this process's environment."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def mostly(view: np.ndarray, colour: str) -> float:
    """Share of the central half of an RGB view that is clearly ``colour``."""
    h, w = view.shape[:2]
    centre = view[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].astype(int)
    r, g, b = centre[..., 0], centre[..., 1], centre[..., 2]
    masks = {"red": (r > 200) & (g < 80) & (b < 80), "green": (g > 200) & (r < 170) & (b < 80)}
    return float(np.mean(masks[colour]))


def test_reproject_axes_png_writes_eight_views_and_yaw0_is_red(panoramas_dir, tmp_path):
    out = tmp_path / "tmp"
    result = mimetic("reproject", str(panoramas_dir / "axes.png"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"axes_{name}" for name in RING8_NAMES)
    for name in pngs:
        with Image.open(out / name) as im:
            assert (im.size, im.mode) == ((224, 224), "RGB")
    yaw0 = np.asarray(Image.open(out / "axes_0_y0_p0.png"))
    assert mostly(yaw0, "red") > 0.6  # SOURCES.md: yaw 0 shows +Z on red
    assert mostly(np.asarray(Image.open(out / "axes_2_y90_p0.png")), "green") > 0.6  # yaw +90: +X on green

    manifest = json.loads((out / "views.json").read_text())
    assert [v["yaw"] for v in manifest["views"]] == [float(y) for y in range(0, 360, 45)]
    assert manifest["failed"] == [] and manifest["view_set"] == "ring8"
    (entry,) = manifest["panoramas"]
    assert entry["source"] == str(panoramas_dir / "axes.png")
    assert (entry["width"], entry["height"]) == (1024, 512)
    assert entry["files"] == [f"axes_{name}" for name in RING8_NAMES]


def test_one_corrupt_panorama_does_not_stop_the_others(panoramas_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    data = (panoramas_dir / "louvre.jpg").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = mimetic("reproject", str(broken), str(panoramas_dir / "axes.png"), "--out", str(out), "--views", "ring4")
    assert result.returncode != 0
    assert f"{broken}: truncated" in result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == [f"axes_{i}_y{yaw}_p0.png" for i, yaw in enumerate((0, 90, 180, 270))]
    manifest = json.loads((out / "views.json").read_text())
    assert [p["source"] for p in manifest["panoramas"]] == [str(panoramas_dir / "axes.png")]
    assert [f["source"] for f in manifest["failed"]] == [str(broken)]


def test_help_is_fast_and_does_not_import_torch():
    result = mimetic("--help")
    assert result.returncode == 0 and "reproject" in result.stdout and "bench" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, engine.cli; engine.cli.build_parser(); print('torch' in sys.modules)"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "False"


def test_version(capsys):
    assert cli.main(["version"]) == 0
    out = capsys.readouterr().out
    for word in ("mimetic", "torch", "triton", "numba", "cuda"):
        assert word in out


def test_cube6_with_size_fov_and_no_antialias(panoramas_dir, tmp_path, capsys):
    out = tmp_path / "cube"
    args = ["reproject", str(panoramas_dir / "axes.png"), "--out", str(out), "--views", "cube6", "--size", "64", "--fov", "100", "--no-antialias"]
    assert cli.main(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(
        ["axes_0_y0_p0.png", "axes_1_y90_p0.png", "axes_2_y180_p0.png", "axes_3_y270_p0.png", "axes_4_y0_p90.png", "axes_5_y0_p-90.png"]
    )
    assert all(Image.open(out / name).size == (64, 64) for name in names)
    manifest = json.loads((out / "views.json").read_text())
    assert {v["fov"] for v in manifest["views"]} == {100.0} and manifest["antialias"] is False


def test_same_stem_twice_gets_a_suffix_not_an_overwrite(panoramas_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "axes.png"
    copy.parent.mkdir()
    Image.fromarray(np.asarray(Image.open(panoramas_dir / "axes.png"))[:, ::-1]).save(copy)  # mirrored: different views
    out = tmp_path / "out"
    assert cli.main(["reproject", str(panoramas_dir / "axes.png"), str(copy), "--out", str(out), "--views", "ring4", "--size", "32"]) == 0
    assert len(list(out.glob("axes_*.png"))) == 4 and len(list(out.glob("axes-2_*.png"))) == 4
    assert [p["stem"] for p in json.loads((out / "views.json").read_text())["panoramas"]] == ["axes", "axes-2"]


def test_not_equirectangular_is_reported_with_the_file_name(tmp_path, capsys):
    square = tmp_path / "square.png"
    Image.new("RGB", (100, 100)).save(square)
    assert cli.main(["reproject", str(square), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{square}: " in err and "2:1" in err


def test_bad_arguments_exit_with_usage_errors(tmp_path, capsys):
    for bad in (["reproject", "x.jpg", "--out", str(tmp_path), "--views", "ring9"], ["reproject", "x.jpg", "--out", str(tmp_path), "--size", "0"], ["reproject", "x.jpg"]):
        with pytest.raises(SystemExit) as info:
            cli.main(bad)
        assert info.value.code == 2
    assert "ring9" in capsys.readouterr().err


def test_bench_calls_run_all_main(monkeypatch):
    calls = []
    run_all = types.SimpleNamespace(main=lambda argv=None: calls.append(argv) or 3)
    monkeypatch.setitem(sys.modules, "bench", types.SimpleNamespace(run_all=run_all, __path__=[]))
    monkeypatch.setitem(sys.modules, "bench.run_all", run_all)
    assert cli.main(["bench", "--quick"]) == 3
    assert cli.main(["bench"]) == 3
    assert calls == [["--quick"], []]
    assert cli.main(["bench", "--out", "somewhere", "--only", "clip"]) == 3
    assert calls[-1] == ["--out", "somewhere", "--only", "clip"]


def test_a_bench_run_leaves_the_reference_results_alone(monkeypatch, tmp_path, capsys):
    """The quickest bench, through ``mimetic bench``: its JSON goes to --out, or by default to bench/runs/."""
    from bench import _results, reproject

    small = tmp_path / "small.png"
    Image.open(_results.PANORAMAS / "louvre.jpg").resize((256, 128)).save(small)
    monkeypatch.setattr(reproject, "DEFAULT_PANO", small)  # a small panorama keeps the run to seconds
    results = _results.RESULTS_DIR
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    assert cli.main(["bench", "--quick", "--only", "reproject", "--out", str(tmp_path / "runs")]) == 0
    [written] = (tmp_path / "runs").glob("reproject-*.json")
    assert json.loads(written.read_text())["bench"] == "reproject"
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
    # Without --out: bench/runs/, which git ignores; bench/results/ keeps only the committed references.
    assert _results.RUNS_DIR == REPO_ROOT / "bench" / "runs"
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/runs/reproject-x.json"], cwd=REPO_ROOT)
    assert ignored.returncode == 0
    monkeypatch.setattr(_results, "RUNS_DIR", tmp_path / "default")
    path = _results.write_result("reproject", "Some CPU", "2026-01-01", {"bench": "reproject"})
    assert path == tmp_path / "default" / "reproject-some-cpu-2026-01-01.json" and path.is_file()
