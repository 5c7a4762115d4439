"""The example plugin: its math, its registration through the entry point, and a run through the CLI."""

import importlib.metadata
import json

import pytest
import torch
from lowrank_rsvd import RandomizedSVD, randomized_svd
from typer.testing import CliRunner

from lowrank_kit.cli.main import app
from lowrank_kit.registry import ALLOW_ENV, get_registry, reset_registry

runner = CliRunner()


def test_recovers_the_truncated_svd_of_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 30, generator=g, dtype=torch.float64
    )
    U, S, Vh = randomized_svd(W, rank=6, oversample=4, power_iters=1, generator=g)
    # W has rank 6, so a 10-direction sketch spans its range and the result is exact up to fp64 rounding.
    assert torch.allclose((U * S) @ Vh, W, atol=1e-9)
    assert torch.allclose(S, torch.linalg.svdvals(W)[:6], rtol=1e-9)


def test_close_to_exact_svd_on_a_full_rank_matrix():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 48, generator=g, dtype=torch.float64)
    _, S, _ = randomized_svd(W, rank=8, oversample=8, power_iters=3, generator=g)
    exact = torch.linalg.svdvals(W)[:8]
    # Power iterations make the top singular values accurate to well under a percent on a Gaussian matrix.
    assert torch.allclose(S, exact, rtol=2e-2)


@pytest.fixture
def fresh_registry(monkeypatch):
    reset_registry()
    yield monkeypatch
    reset_registry()


def test_installed_through_the_entry_point(fresh_registry):
    fresh_registry.delenv(ALLOW_ENV, raising=False)
    eps = [ep for ep in importlib.metadata.entry_points(group="lowrank_kit") if ep.name == "rsvd"]
    assert eps, "lowrank-rsvd is not installed: pip install -e plugins/lowrank-rsvd"
    reg = get_registry()
    assert reg.get("decomposer", "rsvd") is RandomizedSVD
    assert reg.source_of("decomposer", "rsvd") == "rsvd"
    methods = json.loads(runner.invoke(app, ["methods", "--json"]).stdout)
    assert "rsvd" in methods["decomposers"]
    plugins = {p["name"]: p for p in json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)}
    assert plugins["rsvd"]["registered"]["decomposer"] == ["rsvd"]
    assert "lowrank-rsvd" in plugins["rsvd"]["source"]


def test_allow_list_can_exclude_it(fresh_registry):
    fresh_registry.setenv(ALLOW_ENV, "")
    assert "rsvd" not in get_registry().names("decomposer")


def test_runs_through_lowrank_compress(fresh_registry, tmp_path):
    from lowrank_kit.models.tiny import save_tiny_checkpoint

    fresh_registry.delenv(ALLOW_ENV, raising=False)
    model_dir = tmp_path / "tiny"
    save_tiny_checkpoint("llava", model_dir)
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "compress",
            "--model",
            str(model_dir),
            "--method",
            "rsvd",
            "--ratio",
            "0.6",
            "--output",
            str(out),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["method"] == "rsvd"
    assert abs(data["rho1"] - 0.6) < 0.1  # tiny 64-wide matrices: one rank step is ~3% of ρ1
    assert (out / "model.safetensors").is_file()
