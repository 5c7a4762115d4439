"""The real pretrained SmolLM2-135M-Instruct through the user's commands: evaluation by perplexity on the
built-in corpus, every method's compression, and the saved checkpoint loading back to the same numbers.

Slow (the model is real: 135M parameters, 30 layers), run in CI. Calibration and evaluation are kept
short (2 windows each) so the whole file takes about a minute once the model is cached; the accuracy
evidence itself is the real-weights grid in docs/benchmarks.md, not these tests.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

import lowrank_kit
from lowrank_kit.cli.main import _perplexity_evaluation, app
from lowrank_kit.data.text import corpus_text, token_windows
from lowrank_kit.eval.perplexity import perplexity
from lowrank_kit.models import packaged
from lowrank_kit.pipeline import compress_to_directory
from lowrank_kit.recipe import recipe_from_flags

pytestmark = pytest.mark.slow

METHODS = ("svd", "asvd", "svdllm", "qsvd", "wsvd")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_lowrank_models_lists_the_real_model():
    rows = json.loads(invoke("models", "--json").stdout)
    assert "smollm2-135m" in {r["name"] for r in rows}


def test_eval_prints_a_finite_perplexity(smollm2_dir):
    result = invoke(
        "eval", "smollm2-135m", "--data", "text:pydoc", "--json", "--limit", "2", "--seq-len", "256"
    )
    assert result.exit_code == 0, result.output[-2000:]
    summary = json.loads(result.stdout)
    assert summary["windows"] == 2 and summary["tokens"] == 2 * 255
    # A real instruct model on the Python manual: well below the 49152-token vocabulary's uniform guess.
    assert math.isfinite(summary["perplexity"]) and 1.0 < summary["perplexity"] < 100.0


def test_eval_without_the_extra_is_one_line_naming_pip_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(packaged, "missing_extras", lambda: ["gguf", "accelerate"])
    result = invoke("eval", "smollm2-135m", "--data", "text:pydoc", "--json")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'lowrank_kit[real]'" in lines[0]


@pytest.fixture(scope="module")
def windows(smollm2_dir):
    tokenizer = lowrank_kit.load_model("smollm2-135m").processor
    return token_windows(tokenizer, corpus_text("text:pydoc", "evaluation"), 128, max_windows=2)


@pytest.mark.parametrize("method", METHODS)
def test_compressed_checkpoint_loads_back_to_the_same_perplexity(method, windows, tmp_path):
    recipe = recipe_from_flags(
        model="smollm2-135m", method=method, ratio=0.7, calib_samples=2, calib_max_length=128
    )
    # The CLI's --eval-data hook: the report keeps the compressed model's perplexity on these windows.
    evaluate = _perplexity_evaluation("smollm2-135m", "text:pydoc", seq_len=128, limit=2)
    result = compress_to_directory(recipe, tmp_path / "out", use_cache=False, evaluate=evaluate)
    assert result.report["rho1"] == pytest.approx(0.7, abs=0.02)
    assert result.recipe.calibration.source == "text" and result.recipe.calibration.dataset == "text:pydoc"
    in_memory = perplexity(result.model, windows)
    loaded = lowrank_kit.load(tmp_path / "out")
    assert loaded.processor is not None  # the tokenizer travels with the checkpoint
    reloaded = perplexity(loaded.model, windows)
    assert math.isfinite(in_memory["perplexity"])
    assert reloaded["perplexity"] == pytest.approx(in_memory["perplexity"], rel=1e-6)
    saved = json.loads((tmp_path / "out" / "lowrank_report.json").read_text())["evaluation"]
    assert saved["windows"] == 2 and saved["seq_len"] == 128
    assert reloaded["perplexity"] == pytest.approx(saved["perplexity"], rel=1e-6)
