"""lowrank bench accuracy: on the tiny LLaVA (multiple-choice accuracy: outputs, resuming after an
interruption, plugins, errors) and on a tiny Llama with a text corpus (perplexity)."""

import json
import math

import pytest
from eval_helpers import make_items
from torch import nn
from typer.testing import CliRunner

import lowrank_kit.eval.grid as grid
from lowrank_kit.cli.main import app
from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.errors import RecipeError, UnknownNameError
from lowrank_kit.eval.engine import EvaluationError
from lowrank_kit.eval.grid import GridSpec, format_table, run_accuracy_grid
from lowrank_kit.models.tiny import _tiny_tokenizer, save_tiny_checkpoint
from lowrank_kit.recipe import RHO1_MEANING, parse_fractions, parse_list

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
    calls = []
    real = grid.compress

    def counting(model, recipe, **kw):
        calls.append(recipe.decompose.method + "@" + str(recipe.decompose.ratio))
        return real(model, recipe, **kw)

    monkeypatch.setattr(grid, "compress", counting)
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
    assert saved["kind"] == "accuracy" and saved["cells"]["svd@0.9"]["layout"] == "shared"
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


def test_rows_may_carry_a_scheme_and_its_quantizers(workspace, tmp_path, monkeypatch):
    rows = {
        "w4a4 by rtn alone": grid.GridRow(quant="w4a4", quant_methods=("rtn",)),
        "svd@0.8+w8a16": grid.GridRow("svd", 0.8, "w8a16"),
    }
    results_file = grid.ResultsFile(tmp_path / "quant.json")
    results = grid.run_grid(spec(workspace), rows, results_file)
    assert list(results["cells"]) == list(rows)
    rtn = results["cells"]["w4a4 by rtn alone"]
    assert rtn["method"] is None and rtn["rho1"] is None and rtn["rho2"] == 1.0
    assert rtn["quant"] == "w4a4" and rtn["quant_methods"] == ["rtn"]
    both = results["cells"]["svd@0.8+w8a16"]
    assert both["method"] == "svd" and both["quant"] == "w8a16"
    assert both["rho1"] == pytest.approx(0.8, abs=0.01)  # ranks are whole numbers: ρ1 lands near 0.8
    assert both["weight_bytes"] < both["original_weight_bytes"]
    assert all(0 <= c["accuracy"] <= 1 and c["kl"] >= 0 for c in results["cells"].values())
    # The same rows again: every cell and the FP16 reference come from the file.
    monkeypatch.setattr(grid, "compress", lambda *a, **k: pytest.fail("recompressed"))
    monkeypatch.setattr(grid, "evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = grid.run_grid(spec(workspace), rows, results_file)
    assert again["cells"] == results["cells"] and again["fp16"] == results["fp16"]


def test_grid_errors(workspace, tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown method 'wsdv'; available: .*wsvd"):
        run_accuracy_grid(spec(workspace, methods=["wsdv"]), tmp_path / "e")
    with pytest.raises(RecipeError, match=r"--ratios: 1.5 is outside \(0, 1\]; ρ1 is the fraction"):
        parse_fractions("0.9,1.5", "--ratios", RHO1_MEANING)
    with pytest.raises(RecipeError, match=r"--ratios: 'x' is not a number"):
        parse_fractions("0.9,x", "--ratios", RHO1_MEANING)
    with pytest.raises(RecipeError, match=r"--methods lists a value twice"):
        parse_list("svd,svd", "--methods")


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
    with pytest.raises(RecipeError, match=r"'finetune' is not key=value; .*wsvd:finetune=true"):
        grid.parse_method("wsvd:finetune")
    with pytest.raises(RecipeError, match=r"sets 'ft_steps' twice"):
        grid.parse_method("wsvd:ft_steps=1:ft_steps=2")
    with pytest.raises(UnknownNameError, match=r"unknown method 'wsdv'"):
        grid.check_methods(["wsdv:finetune=false"])


def test_a_row_with_method_parameters(workspace, tmp_path, monkeypatch):
    seen = []
    real = grid.compress

    def recording(model, recipe, **kw):
        seen.append((recipe.decompose.method, recipe.decompose.params["finetune"]))
        return real(model, recipe, **kw)

    monkeypatch.setattr(grid, "compress", recording)
    # The tiny LLaVA's own items: `source: auto` would mean ScienceQA from the hub.
    calib = dict(calib_samples=2, calib_source="tsv", calib_path=str(workspace / "data.tsv"))
    results = run_accuracy_grid(
        spec(workspace, methods=["wsvd", "wsvd:finetune=true"], ratios=[0.8], **calib), tmp_path / "p"
    )
    assert sorted(seen) == [("wsvd", False), ("wsvd", True)]
    assert set(results["cells"]) == {"wsvd@0.8", "wsvd:finetune=true@0.8"}
    assert "| wsvd:finetune=true |" in (tmp_path / "p" / "table.md").read_text()
    # A parameter the method does not have is the recipe's error, before any model work.
    with pytest.raises(RecipeError, match="fine_tune"):
        run_accuracy_grid(spec(workspace, methods=["wsvd:fine_tune=false"]), tmp_path / "bad")


# -- perplexity on a text corpus ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random Llama with a character-level tokenizer: a text-only model, so text is its data."""
    path = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("text") / "model")
    _tiny_tokenizer().save_pretrained(path)
    return path


def text_spec(model, **kw):
    base = dict(
        model=str(model),
        methods=["wsvd", "svd"],
        ratios=[0.9, 0.5],
        data="text:pydoc",
        limit=2,
        seq_len=32,
        batch_size=2,
        calib_dataset="text:pydoc",
        calib_samples=2,
        calib_max_length=32,
    )
    return GridSpec(**{**base, **kw})


def _table_rows(table, heading):
    """The data rows of the markdown table under ``heading`` (FP16 first), as lists of cells."""
    block = table.split(heading, 1)[1].split("###", 1)[0]
    lines = [x for x in block.splitlines() if x.startswith("|")]
    return [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]


def test_text_grid_scores_perplexity_and_kl_and_resumes(text_model, tmp_path, count_compress, monkeypatch):
    built = []
    real_build = grid.build_calibration
    monkeypatch.setattr(grid, "build_calibration", lambda *a, **k: built.append(a[0]) or real_build(*a, **k))
    results = run_accuracy_grid(text_spec(text_model), tmp_path / "out")
    assert sorted(count_compress) == ["svd@0.5", "svd@0.9", "wsvd@0.5", "wsvd@0.9"]
    # One calibration set for both wsvd cells (svd needs none), from the corpus's calibration part.
    assert len(built) == 1 and built[0].source == "text" and built[0].dataset == "text:pydoc"

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["kind"] == "perplexity" and saved["n"] == 2 and saved["settings"]["seq_len"] == 32
    fp16 = saved["fp16"]
    assert math.isfinite(fp16["perplexity"]) and fp16["kl"] is None and "items" not in fp16
    assert (fp16["tokens"], fp16["windows"]) == (2 * 31, 2)
    for key, cell in saved["cells"].items():
        fields = {"method", "ratio", "rho1", "rho2", "perplexity", "nll", "kl", "tokens", "windows", "layout"}
        assert fields | {"compress_seconds", "eval_seconds"} <= set(cell), key
        assert math.isfinite(cell["perplexity"]) and cell["perplexity"] == pytest.approx(
            math.exp(cell["nll"])
        )
        assert cell["kl"] > 0  # compressed: its next-token distributions moved away from FP16's
        assert (cell["tokens"], cell["windows"]) == (2 * 31, 2)
        assert cell["layout"] == {"wsvd": "per_head", "svd": "shared"}[cell["method"]]
    assert saved["cells"]["svd@0.5"]["rho1"] < saved["cells"]["svd@0.9"]["rho1"]
    assert results["cells"] == saved["cells"]

    table = (tmp_path / "out" / "table.md").read_text()
    assert f"FP16 (uncompressed, float32): perplexity {fp16['perplexity']:.2f}" in table
    by_rho1 = _table_rows(table, "### By ρ1")
    assert "| Method | layout | ρ1 = 0.9 | ρ1 = 0.5 |" in table
    assert [r[:2] for r in by_rho1] == [
        ["FP16 (uncompressed, float32)", "dense"],
        ["wsvd", "per_head"],
        ["svd", "shared"],
    ]
    wsvd_05 = saved["cells"]["wsvd@0.5"]
    assert by_rho1[1][3] == (
        f"{wsvd_05['perplexity']:.2f}<br><sub>KL {wsvd_05['kl']:.4f} · ρ1 {wsvd_05['rho1']:.2f} · "
        f"ρ2 {wsvd_05['rho2']:.2f}</sub>"
    )
    by_rho2 = _table_rows(table, "### At equal ρ2")
    assert len(by_rho2) == 5 and by_rho2[0][1].startswith("FP16")
    rho2s = [float(r[0]) for r in by_rho2]
    assert rho2s == sorted(rho2s, reverse=True)
    assert sorted((r[1], r[3]) for r in by_rho2[1:]) == [
        ("svd", "0.5"),
        ("svd", "0.9"),
        ("wsvd", "0.5"),
        ("wsvd", "0.9"),
    ]
    assert (tmp_path / "out" / "perplexity_vs_rho.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out" / "accuracy_vs_rho1.png").exists()

    # A rerun reuses every cell: nothing is compressed or calibrated again.
    count_compress.clear()
    built.clear()
    again = run_accuracy_grid(text_spec(text_model), tmp_path / "out")
    assert count_compress == [] and built == []
    assert again["cells"] == saved["cells"] and again["fp16"] == fp16

    # Another window length is other data: the cell is computed again.
    changed = run_accuracy_grid(
        text_spec(text_model, methods=["svd"], ratios=[0.9], seq_len=16), tmp_path / "out"
    )
    assert count_compress == ["svd@0.9"]
    assert changed["cells"]["svd@0.9"]["tokens"] == 2 * 15
    assert changed["cells"]["svd@0.9"]["fingerprint"] != saved["cells"]["svd@0.9"]["fingerprint"]


def test_text_grid_errors(text_model, workspace, tmp_path, monkeypatch):
    with pytest.raises(EvaluationError, match=r"^--seq-len must be at least 2 tokens, got 1$"):
        run_accuracy_grid(text_spec(text_model, seq_len=1), tmp_path / "e")
    with pytest.raises(EvaluationError, match=r"^--limit must be at least 1 window, got 0$"):
        run_accuracy_grid(text_spec(text_model, limit=0), tmp_path / "e")
    # A text-only model is scored on text: image questions are refused, before the model loads...
    with pytest.raises(
        EvaluationError,
        match=r"is a text-only language model, scored by perplexity on a text corpus; --data must be one "
        r"\(text:pydoc, .*\), got 'testbed'$",
    ):
        run_accuracy_grid(text_spec(text_model, data="testbed"), tmp_path / "e")
    # ... or, where its config could not be read beforehand (a hub id not in the cache), once it has.
    monkeypatch.setattr(grid, "calibration_context", lambda model: None)
    with pytest.raises(
        EvaluationError, match=r"is a text-only language model, so it cannot answer the image"
    ):
        run_accuracy_grid(text_spec(text_model, data=str(workspace / "data.tsv")), tmp_path / "e")


def test_cli_text_grid(text_model, tmp_path):
    args = [
        "bench", "accuracy", str(text_model), "--data", "text:pydoc", "--methods", "svd,wsvd:finetune=false",
        "--ratios", "0.7", "--limit", "2", "--seq-len", "32", "--batch-size", "2",
        "--calib-dataset", "text:pydoc", "--calib-samples", "2", "--calib-max-length", "32",
        "--calib-split", "train", "--output", str(tmp_path / "cli"), "--no-cache",
    ]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and "per_head" in res.stdout and "perplexity_vs_rho.png" in res.stdout
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["kind"] == "perplexity" and set(saved["cells"]) == {"svd@0.7", "wsvd:finetune=false@0.7"}

    res = runner.invoke(app, [*args, "--json"])  # resumes from the same output
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "perplexity" and math.isfinite(data["fp16"]["perplexity"])
    assert {(r["method"], r["layout"]) for r in data["rows"]} == {
        ("svd", "shared"),
        ("wsvd:finetune=false", "per_head"),
    }
    assert all(r["kl"] > 0 and r["windows"] == 2 for r in data["rows"])
    assert data["rows"] == [
        {k: v for k, v in c.items() if k != "fingerprint"} for c in saved["cells"].values()
    ]


def test_cli_model_given_twice_is_one_line(text_model):
    res = runner.invoke(
        app, ["bench", "accuracy", str(text_model), "--model", "testbed", "--data", "text:pydoc"]
    )
    assert res.exit_code == 2
    assert res.output.strip().startswith("Error: give the model once, as MODEL or --model; got ")


# -- one model compressed in place per cell -----------------------------------------------------------
def scores(cell):
    return {k: cell[k] for k in ("perplexity", "nll", "kl", "rho1", "rho2", "layout")}


@pytest.mark.parametrize("quant", [None, "w8a8-kv8-qat"])
def test_a_cell_scores_the_same_whatever_ran_before_it(text_model, tmp_path, monkeypatch, quant):
    def no_module_copies(self, memo):
        raise AssertionError(f"the grid deep-copied a {type(self).__name__}")

    monkeypatch.setattr(nn.Module, "__deepcopy__", no_module_copies, raising=False)
    methods = ["wsvd", "svdllm", "svd"]
    together = run_accuracy_grid(
        text_spec(text_model, methods=methods, ratios=[0.5], quant=quant), tmp_path / "all"
    )
    for method in methods[1:]:
        alone = run_accuracy_grid(
            text_spec(text_model, methods=[method], ratios=[0.5], quant=quant), tmp_path / method
        )
        (key,) = alone["cells"]
        assert scores(together["cells"][key]) == scores(alone["cells"][key]), key
        assert together["fp16"]["perplexity"] == alone["fp16"]["perplexity"]
        assert together["cells"][key]["kl"] > 0
