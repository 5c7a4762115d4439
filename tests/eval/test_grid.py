"""lowrank bench accuracy on the tiny LLaVA: outputs, resuming after an interruption, plugins, errors."""

import json

import pytest
from eval_helpers import make_items
from typer.testing import CliRunner

import lowrank_kit.eval.grid as grid
from lowrank_kit.cli.main import app
from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.errors import RecipeError, UnknownNameError
from lowrank_kit.eval.grid import GridSpec, format_table, parse_ratios, run_accuracy_grid
from lowrank_kit.models.tiny import save_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    save_tiny_checkpoint("llava", root / "model")
    write_tsv(make_items(4), root / "data.tsv")
    return root


def spec(workspace, **kw):
    base = dict(
        model=str(workspace / "model"),
        methods=["svd", "rsvd"],  # rsvd comes from the example plugin, by name like a built-in
        ratios=[0.9, 0.5],
        data=str(workspace / "data.tsv"),
        max_new_tokens=2,
        batch_size=4,
    )
    return GridSpec(**{**base, **kw})


@pytest.fixture
def count_compress(monkeypatch):
    import lowrank_kit.pipeline as pipeline

    calls = []
    real = pipeline.compress

    def counting(model, recipe, **kw):
        calls.append(recipe.decompose.method + "@" + str(recipe.decompose.ratio))
        return real(model, recipe, **kw)

    monkeypatch.setattr(pipeline, "compress", counting)
    return calls


def test_grid_writes_json_table_and_plot(workspace, tmp_path, count_compress):
    results = run_accuracy_grid(spec(workspace), tmp_path / "out")
    assert sorted(count_compress) == ["rsvd@0.5", "rsvd@0.9", "svd@0.5", "svd@0.9"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["cells"].keys() == results["cells"].keys() == {"svd@0.9", "svd@0.5", "rsvd@0.9", "rsvd@0.5"}
    assert saved["fp16"]["n"] == 4 and len(saved["fp16"]["items"]) == 4
    for cell in saved["cells"].values():
        assert {"method", "ratio", "accuracy", "nll", "kl", "rho1", "rho2", "per_category"} <= set(cell)
        assert cell["kl"] >= 0
    # The measured ρ1 follows the requested one.
    assert saved["cells"]["svd@0.5"]["rho1"] < saved["cells"]["svd@0.9"]["rho1"] <= 0.9 + 1e-9
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| Method | ρ1 = 0.9 | ρ1 = 0.5 | Avg. |" in table
    assert "| FP16 (uncompressed, float32) |" in table and "| rsvd |" in table and "ρ2 " in table
    assert (tmp_path / "out" / "accuracy_vs_rho1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_average_column():
    results = {
        "model": "m",
        "data": "d",
        "n": 2,
        "quant": None,
        "methods": ["svd"],
        "ratios": [0.9, 0.5],
        "settings": {"dtype": "torch.float32"},
        "fp16": {"accuracy": 1.0},
        "cells": {
            "svd@0.9": {"method": "svd", "ratio": 0.9, "accuracy": 0.75, "rho2": 0.6},
            "svd@0.5": {"method": "svd", "ratio": 0.5, "accuracy": 0.25, "rho2": 0.3},
        },
    }
    line = next(x for x in format_table(results).splitlines() if x.startswith("| svd"))
    assert line == "| svd | 75.0<br><sub>ρ2 0.60</sub> | 25.0<br><sub>ρ2 0.30</sub> | 50.0 |"


def test_an_interrupted_grid_resumes_where_it_stopped(workspace, tmp_path, monkeypatch, count_compress):
    real = grid.evaluate
    calls = {"n": 0}

    def dies_on_the_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # FP16, first cell, then the kill
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(grid, "evaluate", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_accuracy_grid(spec(workspace), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["cells"]) == ["svd@0.9"] and saved["fp16"] is not None
    first = saved["cells"]["svd@0.9"]

    monkeypatch.setattr(grid, "evaluate", real)
    count_compress.clear()
    results = run_accuracy_grid(spec(workspace), tmp_path / "out")
    assert sorted(count_compress) == ["rsvd@0.5", "rsvd@0.9", "svd@0.5"]  # the finished cell is kept
    assert results["cells"]["svd@0.9"] == first

    # Changed settings: the finished cell is computed again.
    count_compress.clear()
    changed = run_accuracy_grid(
        spec(workspace, methods=["svd"], ratios=[0.9], max_new_tokens=3), tmp_path / "out"
    )
    assert count_compress == ["svd@0.9"]
    assert changed["cells"]["svd@0.9"]["fingerprint"] != first["fingerprint"]


def test_quantization_is_passed_to_every_cell(workspace, tmp_path):
    results = run_accuracy_grid(spec(workspace, methods=["svd"], ratios=[0.8], quant="w8a16"), tmp_path / "q")
    assert results["cells"]["svd@0.8"]["quant"] == "w8a16"
    assert "svd + w8a16" in (tmp_path / "q" / "table.md").read_text()


def test_grid_errors(workspace, tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown method 'wsdv'; available: .*wsvd"):
        run_accuracy_grid(spec(workspace, methods=["wsdv"]), tmp_path / "e")
    with pytest.raises(RecipeError, match=r"--ratios: 1.5 is outside \(0, 1\]"):
        parse_ratios("0.9,1.5")
    with pytest.raises(RecipeError, match=r"--ratios: 'x' is not a number"):
        parse_ratios("0.9,x")
    with pytest.raises(RecipeError, match=r"--methods lists a value twice"):
        grid.parse_list("svd,svd", "methods")


def test_cli_json(workspace, tmp_path):
    res = runner.invoke(
        app,
        [
            "bench", "accuracy", "--model", str(workspace / "model"), "--methods", "svd", "--ratios", "0.7",
            "--data", str(workspace / "data.tsv"), "--max-new-tokens", "2", "--output", str(tmp_path / "cli"),
            "--no-cache", "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"accuracy", "nll", "n"} <= set(data["fp16"])
    (row,) = data["rows"]
    assert {"method", "ratio", "accuracy", "nll", "rho1", "rho2"} <= set(row)
    assert row["method"] == "svd" and row["ratio"] == 0.7


def test_cli_bad_method_is_one_line(workspace, tmp_path):
    res = runner.invoke(app, ["bench", "accuracy", "--model", str(workspace / "model"), "--methods", "nope"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("Error: unknown method 'nope'") and "Traceback" not in res.output


def test_method_parameters():
    assert grid.parse_method("wsvd") == ("wsvd", {})
    assert grid.parse_method("wsvd:finetune=false:ft_steps=10") == (
        "wsvd",
        {"finetune": False, "ft_steps": 10},
    )
    with pytest.raises(RecipeError, match=r"'finetune' is not key=value; .*wsvd:finetune=false"):
        grid.parse_method("wsvd:finetune")
    with pytest.raises(RecipeError, match=r"sets 'ft_steps' twice"):
        grid.parse_method("wsvd:ft_steps=1:ft_steps=2")
    with pytest.raises(UnknownNameError, match=r"unknown method 'wsdv'"):
        grid.check_methods(["wsdv:finetune=false"])


def test_a_row_with_method_parameters(workspace, tmp_path, monkeypatch):
    import lowrank_kit.pipeline as pipeline

    seen = []
    real = pipeline.compress

    def recording(model, recipe, **kw):
        seen.append((recipe.decompose.method, recipe.decompose.params["finetune"]))
        return real(model, recipe, **kw)

    monkeypatch.setattr(pipeline, "compress", recording)
    results = run_accuracy_grid(
        spec(workspace, methods=["wsvd", "wsvd:finetune=false"], ratios=[0.8], calib_samples=2),
        tmp_path / "p",
    )
    assert sorted(seen) == [("wsvd", False), ("wsvd", True)]
    assert set(results["cells"]) == {"wsvd@0.8", "wsvd:finetune=false@0.8"}
    assert "| wsvd:finetune=false |" in (tmp_path / "p" / "table.md").read_text()
    # A parameter the method does not have is the recipe's error, before any model work.
    with pytest.raises(RecipeError, match="fine_tune"):
        run_accuracy_grid(spec(workspace, methods=["wsvd:fine_tune=false"]), tmp_path / "bad")
