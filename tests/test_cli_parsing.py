"""The root command's parsing: one line for a mistake, unknown commands refused, kernel backends read from kernels."""

from __future__ import annotations

import pytest

from engine import cli

from .conftest import PANORAMAS
from .test_cli import mimetic


def test_an_unknown_command_is_one_line_and_exit_2_not_the_benchmarks(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(cli, "cmd_bench", lambda args, extra: ran.append(args) or 0)
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate", "--quick"])
    assert info.value.code == 2 and ran == []
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("mimetic: error: argument COMMAND: invalid choice: 'frobnicate'") and "'bench'" in line


def test_a_flag_mistake_is_one_line_naming_the_command():
    run = mimetic("reproject", str(PANORAMAS / "axes.png"), "--size", "0", "--out", "x")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith("mimetic reproject: error: argument --size: expected a positive integer, got 0")
    assert "mimetic reproject --help" in line  # where to look, instead of the whole usage
    run = mimetic("models")  # a nested command's parser is the same kind
    [line] = run.stderr.splitlines()
    assert run.returncode == 2 and line.startswith("mimetic models: error: the following arguments are required: ACTION")


def test_reproject_backends_are_the_kernels_own(tmp_path, capsys):
    from kernels import BACKENDS

    parser = cli.build_parser()
    for backend in ("auto", "triton", "numba", "torch"):  # every backend the kernels have, by name
        assert backend in BACKENDS
        args = parser.parse_args(["reproject", "p.png", "--out", str(tmp_path), "--backend", backend])
        assert args.backend == backend
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["reproject", "p.png", "--out", str(tmp_path), "--backend", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'cuda' (choose from 'auto', 'triton', 'numba', 'torch')" in err
    assert "kernel backend: auto, triton, numba, torch" in " ".join(mimetic("reproject", "--help").stdout.split())
