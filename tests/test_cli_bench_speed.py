"""`lowrank bench speed` on a machine without a GPU: argument errors first, then one line saying it
needs CUDA; never a traceback."""

import pytest
import torch
from typer.testing import CliRunner

from lowrank_kit.cli.main import app
from lowrank_kit.models.presets import PRESETS

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    # The command's answer on a machine without CUDA, whatever machine runs the test.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def speed(*args):
    return runner.invoke(app, ["bench", "speed", *map(str, args)], catch_exceptions=False)


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def test_without_cuda_it_says_so_in_one_line(tmp_path):
    line = one_error_line(speed("--arch", "llava-next-7b", "--output", tmp_path / "out"))
    assert "lowrank bench speed needs a CUDA GPU, and this machine has none" in line
    assert not (tmp_path / "out").exists()  # nothing was started


def test_unknown_alias_lists_the_valid_ones():
    line = one_error_line(speed("--arch", "llava-next-8b"))
    assert "unknown model alias 'llava-next-8b'; available: " in line
    assert all(alias in line for alias in PRESETS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "--batch takes comma-separated positive integers, e.g. 8,16; got '0'"),
        (["--batch", "8,x"], "--batch takes comma-separated positive integers, e.g. 8,16; got '8,x'"),
        (["--seq", "1024,1024"], "--seq lists a value twice: '1024,1024'"),
        (["--rho2", "1.5"], "--rho2: 1.5 is outside (0, 1]"),
        (["--rho2", "half"], "--rho2: 'half' is not a number; give fractions in (0, 1], e.g. 0.9,0.5"),
        (["--ratio", "0"], "--ratio: 0.0 is outside (0, 1]; ρ1 is the fraction of parameters kept"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--no-kernel", "--no-e2e"], "--no-kernel and --no-e2e together leave nothing to run"),
    ],
)
def test_argument_errors_come_before_the_cuda_check(args, message):
    line = one_error_line(speed("--arch", "qwen2-vl-7b", *args))
    assert message in line


def test_arch_is_required():
    res = speed()
    assert res.exit_code == 2 and "Missing option '--arch'" in res.output and "Traceback" not in res.output
