"""A user's mistake, made on the command line: one line ``mimetic CMD: error: ...``, exit status 2, no traceback.

Every case runs ``mimetic`` in a subprocess, as a user does, so what is checked is exactly what they see.
"""

from __future__ import annotations

import socket

import pytest
import torch

from engine import cli
from engine.models.tiny import make_tiny_clip

from .conftest import PANORAMAS
from .test_cli import mimetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


def one_error_line(run, command: str) -> str:
    """The single stderr line of a refused command; fails on a traceback, several lines or another status."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert run.returncode == 2 and len(lines) == 1, (run.returncode, run.stderr)
    assert lines[0].startswith(f"mimetic {command}: error: "), lines[0]
    return lines[0]


def test_the_readmes_first_embed_example_without_the_weights(tmp_path):
    weights = tmp_path / "weights" / "vit-b-32.safetensors"
    run = mimetic("embed", "rome/*.jpg", "--clip-model", "ViT-B-32", "--clip-weights", str(weights), "--out", str(tmp_path / "rome.parquet"))
    line = one_error_line(run, "embed")
    assert f"--clip-weights {weights}: checkpoint file not found" in line and "--random-weights" in line
    assert not (tmp_path / "rome.parquet").exists()


@pytest.mark.parametrize("command", ["embed", "demo"])
def test_an_unknown_model(command, tmp_path):
    run = mimetic(command, str(PANORAMAS / "axes.png"), "--clip-model", "ViT-Z-99", "--random-weights", "--out", str(tmp_path / "out"))
    assert "--clip-model ViT-Z-99: unknown open_clip architecture" in one_error_line(run, command)


@pytest.mark.parametrize(("flag", "typo", "message"), [("--views", "rign8", "unknown view set 'rign8'"), ("--vocabularies", "stlyes", "unknown vocabulary 'stlyes'")])
def test_a_typo_in_views_or_vocabularies(tiny, tmp_path, flag, typo, message):
    run = mimetic("embed", str(PANORAMAS / "axes.png"), "--clip-model", tiny, flag, typo, "--out", str(tmp_path / "r.parquet"))
    line = one_error_line(run, "embed")
    assert message in line and ("ring8" if flag == "--views" else "styles") in line  # and what it could have been


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
@pytest.mark.parametrize("command", ["embed", "ingest"])
def test_cuda_without_cuda(tiny, tmp_path, command):
    run = mimetic(command, str(PANORAMAS), "--clip-model", tiny, "--device", "cuda", "--out", str(tmp_path / "out"))
    assert "--device cuda: torch sees no CUDA device" in one_error_line(run, command)


def test_call_embed_with_a_views_typo():
    with socket.socket() as probe:  # a port nobody listens on: the typo is caught before any connection
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = mimetic("call", "embed", f"127.0.0.1:{port}", str(PANORAMAS / "axes.png"), "--views", "rign8")
    assert "rign8" in one_error_line(run, "call")


def test_an_unwritable_output_is_one_line_naming_the_path():
    run = mimetic("demo", "--out", "/dev/null/demo", "--random-weights")
    assert one_error_line(run, "demo") == "mimetic demo: error: /dev/null/demo: Not a directory"


def test_a_setting_error_is_one_error_before_any_work_in_the_clis_words(tmp_path):
    out = tmp_path / "views"
    run = mimetic("reproject", str(PANORAMAS / "axes.png"), str(PANORAMAS / "louvre.jpg"), "--backend", "torch", "--out", str(out))
    line = one_error_line(run, "reproject")
    assert "--no-antialias" in line and "antialias=False" not in line
    assert not out.exists()  # nothing was read or written
    fine = mimetic("reproject", str(PANORAMAS / "axes.png"), "--backend", "torch", "--no-antialias", "--views", "ring4", "--out", str(out))
    assert fine.returncode == 0, fine.stderr
    assert len(list(out.glob("axes_*.png"))) == 4


def test_a_bad_input_is_named_once(tiny, tmp_path):
    bad = tmp_path / "bad" / "x.jpg"
    bad.parent.mkdir()
    bad.write_bytes((PANORAMAS / "louvre.jpg").read_bytes()[:3000])
    run = mimetic("embed", str(bad), str(PANORAMAS / "axes.png"), "--clip-model", tiny, "--views", "ring4", "--out", str(tmp_path / "r.parquet"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    [line] = [line for line in run.stderr.splitlines() if "x.jpg" in line]
    assert line.startswith(f"{bad}: ") and line.count("x.jpg") == 1, line


def test_mimetic_traceback_shows_the_traceback(tmp_path):
    run = mimetic("demo", "--out", "/dev/null/demo", "--random-weights", env={cli.TRACEBACK_ENV: "1"})
    assert run.returncode != 0 and "Traceback" in run.stderr and "NotADirectoryError" in run.stderr
    assert cli.TRACEBACK_ENV in mimetic("--help").stdout  # and --help says so


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_version", interrupted)
    assert cli.main(["version"]) == 130
    assert capsys.readouterr().err == "mimetic version: interrupted\n"


def test_call_gives_up_after_its_retry_budget_in_one_line():
    """`call` used to stop after two quick retries; it now waits out --retry-budget (default 60 s) for a restart."""
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    run = mimetic("call", "info", f"127.0.0.1:{port}", "--retry-budget", "2")
    waited = time.monotonic() - started
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith(f"mimetic call: error: 127.0.0.1:{port}: no answer for 2.") and "retry budget of 2 s" in line
    assert 2.0 <= waited < 30


def test_a_command_no_runner_claims_is_an_error_not_the_benchmarks(monkeypatch):
    """`main` used to fall through to `bench` for any command it did not dispatch itself."""
    ran = []
    args = cli.build_parser().parse_args(["loop", "x.png", "--out", "o"])
    monkeypatch.setattr(cli, "cmd_bench", lambda args, extra: ran.append(args.command) or 0)
    monkeypatch.setattr(cli, "_command_modules", lambda: [])  # a command whose module forgot to claim it
    with pytest.raises(NotImplementedError, match="mimetic loop: no runner"):
        cli.run_command(args, [])
    assert ran == []
