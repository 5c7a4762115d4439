"""`lowrank eval` through typer's CliRunner: JSON fields, tables, reference, cache, backends, errors."""

import json
import sys

import pytest
from eval_helpers import make_items
from typer.testing import CliRunner

from lowrank_kit.cli.main import app
from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.models.tiny import save_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-eval")
    save_tiny_checkpoint("llava", root / "model")
    save_tiny_checkpoint("llava", root / "other", seed=1)
    write_tsv(make_items(4), root / "data.tsv")
    return root


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path / "cache"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_json_has_the_documented_fields(workspace, tmp_path):
    res = invoke(
        "eval", workspace / "model", "--data", workspace / "data.tsv", "--max-new-tokens", 2, "--json",
        "--output", tmp_path / "full.json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"accuracy", "n", "per_category", "nll"} <= set(data)
    assert data["n"] == 4 and set(data["per_category"]) == {"cat0", "cat1"} and data["kl"] is None
    full = json.loads((tmp_path / "full.json").read_text())
    assert len(full["items"]) == 4 and {"prediction", "predicted", "correct", "nll"} <= set(full["items"][0])


def test_reference_adds_kl_and_the_cache_is_used_on_a_rerun(workspace):
    args = ["eval", workspace / "model", "--data", workspace / "data.tsv", "--max-new-tokens", 2, "--json"]
    first = json.loads(invoke(*args, "--reference", workspace / "other").stdout)
    assert first["kl"] > 0 and first["reference_accuracy"] is not None
    again = json.loads(invoke(*args).stdout)
    assert again["cache_hits"] == 4 and again["accuracy"] == first["accuracy"]
    fresh = json.loads(invoke(*args, "--no-cache").stdout)
    assert fresh["cache_hits"] == 0 and fresh["nll"] == pytest.approx(first["nll"])


def test_table_output(workspace):
    res = invoke(
        "eval", workspace / "model", "--data", workspace / "data.tsv", "--max-new-tokens", 1, "--limit", 2
    )
    assert res.exit_code == 0, res.output
    assert (
        "accuracy" in res.stdout
        and "per category" in res.stdout
        and "NLL of the correct letter" in res.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nope.tsv"], r"Error: TSV file 'nope.tsv' does not exist"),
        (
            ["--data", "DATA", "--backend", "onnx"],
            r"Error: unknown backend 'onnx'; available: native, vlmeval",
        ),
        (
            ["--data", "DATA", "--prompt-style", "x"],
            r"Error: unknown prompt style 'x'; available: letter, dataset",
        ),
        (["--data", "DATA", "--batch-size", "0"], r"Error: batch_size must be a positive integer, got 0"),
        (
            ["--data", "DATA", "--no-cache", "--cache-dir", "c"],
            r"Error: --no-cache and --cache-dir contradict",
        ),
        (["--data", "DATA", "--limit", "0"], r"Error: --limit must be a positive integer, got 0"),
    ],
)
def test_errors_are_one_line(workspace, args, message):
    import re

    args = [str(workspace / "data.tsv") if a == "DATA" else a for a in args]
    res = invoke("eval", workspace / "model", *args)
    assert res.exit_code == 2, res.output
    assert re.search(message, res.output) and "Traceback" not in res.output


def test_vlmeval_backend_without_vlmeval_says_how_to_install(workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "vlmeval", None)  # makes `import vlmeval` fail
    res = invoke("eval", workspace / "model", "--data", workspace / "data.tsv", "--backend", "vlmeval")
    assert res.exit_code == 2
    assert (
        "needs VLMEvalKit" in res.output
        and "git clone https://github.com/open-compass/VLMEvalKit" in res.output
    )


def test_vlmeval_backend_refuses_a_reference(workspace):
    res = invoke(
        "eval", workspace / "model", "--data", workspace / "data.tsv", "--backend", "vlmeval",
        "--reference", workspace / "other",
    )  # fmt: skip
    assert res.exit_code == 2 and "--reference needs --backend native" in res.output


def test_a_compressed_output_directory_evaluates_against_its_original(workspace, tmp_path):
    from lowrank_kit.pipeline import compress_to_directory
    from lowrank_kit.recipe import recipe_from_flags

    recipe = recipe_from_flags(model=str(workspace / "model"), method="svd", ratio=0.5)
    compress_to_directory(recipe, tmp_path / "svd-0.5", use_cache=False)
    res = invoke(
        "eval", tmp_path / "svd-0.5", "--data", workspace / "data.tsv", "--max-new-tokens", 1,
        "--reference", workspace / "model", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kl"] > 0 and data["n"] == 4


# -- perplexity on text ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """Two tiny random Llamas (different seeds) with a character-level tokenizer: text-only models."""
    from lowrank_kit.models.tiny import _tiny_tokenizer

    root = tmp_path_factory.mktemp("cli-eval-text")
    for name, seed in (("model", 0), ("other", 1)):
        save_tiny_checkpoint("llama", root / name, seed=seed)
        _tiny_tokenizer().save_pretrained(root / name)
    return root


def test_text_corpus_prints_perplexity_and_kl(text_models):
    args = ["eval", str(text_models / "model"), "--data", "text:pydoc", "--limit", "3", "--seq-len", "16"]
    alone = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert alone["windows"] == 3 and alone["tokens"] == 3 * 15 and alone["kl"] is None
    assert alone["perplexity"] > 1.0
    same = json.loads(runner.invoke(app, [*args, "--reference", str(text_models / "model"), "--json"]).stdout)
    assert same["perplexity"] == pytest.approx(alone["perplexity"]) and same["kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    other = json.loads(
        runner.invoke(app, [*args, "--reference", str(text_models / "other"), "--json"]).stdout
    )
    assert other["kl"] > 0.0
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "perplexity" in table.stdout and "3 windows of 16 tokens" in table.stdout


def test_a_text_model_on_image_questions_is_one_line(text_models):
    result = runner.invoke(app, ["eval", str(text_models / "model"), "--data", "testbed"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "text:pydoc" in lines[0]


def test_compress_records_perplexity_that_the_checkpoint_reproduces(text_models, tmp_path):
    out = tmp_path / "ckpt"
    res = runner.invoke(
        app,
        [
            "compress", "--model", str(text_models / "model"), "--method", "svd", "--ratio", "0.7",
            "--output", str(out), "--eval-data", "text:pydoc", "--eval-seq-len", "16", "--eval-limit", "3",
            "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    reported = json.loads(res.stdout)["evaluation"]
    assert reported["windows"] == 3 and reported["seq_len"] == 16
    assert json.loads((out / "lowrank_report.json").read_text())["evaluation"] == reported
    args = ["eval", str(out), "--data", "text:pydoc", "--limit", "3", "--seq-len", "16", "--json"]
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-6)


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--eval-data", "text:pydoc", "--eval-seq-len", "1"],
            "--eval-seq-len must be at least 2 tokens, got 1",
        ),
        (["--eval-data", "pydoc"], "pydoc"),
    ],
)
def test_compress_eval_options_fail_before_any_work(text_models, tmp_path, extra, message):
    args = ["compress", "--model", str(text_models / "model"), "--method", "svd", "--ratio", "0.7"]
    res = runner.invoke(app, [*args, "--output", str(tmp_path / "x"), *extra])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "x").exists()
