"""The grid compresses its one loaded model in place and puts it back after each cell: no model is
deep-copied, a cell scores the same whatever ran before it, and ModelSnapshot restores every kind of
compression (module swaps, in-place Hadamard folding, untied embeddings)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_kit
from lowrank_kit.eval.grid import GridSpec, run_accuracy_grid
from lowrank_kit.models.tiny import _tiny_tokenizer, build_tiny_model, save_tiny_checkpoint, tiny_inputs
from lowrank_kit.snapshot import ModelSnapshot

sys.path.insert(0, str(Path(__file__).parents[1] / "checkpoint"))
from ckpt_helpers import greedy, samples_for


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    path = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("text") / "model")
    _tiny_tokenizer().save_pretrained(path)
    return path


def text_spec(model, **kw):
    base = dict(
        model=str(model),
        data="text:pydoc",
        limit=2,
        seq_len=32,
        batch_size=2,
        calib_dataset="text:pydoc",
        calib_samples=2,
        calib_max_length=32,
    )
    return GridSpec(**{**base, **kw})


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


@pytest.mark.parametrize(
    "family,method,quant",
    [
        ("llava", "wsvd", None),
        ("qwen2_vl", "qsvd", None),
        ("llava", "wsvd", "w8a8-kv8-qat"),
        ("qwen3", "svd", "w8a4"),
        ("smolvlm", "svdllm", "w4a16"),
    ],
)
def test_snapshot_restores_the_model(family, method, quant):
    model = build_tiny_model(family, seed=0)
    fresh = build_tiny_model(family, seed=0)
    inputs = tiny_inputs(model, seed=2)
    want = greedy(model, inputs)
    structure = [(n, type(m)) for n, m in model.named_modules()]
    snapshot = ModelSnapshot(model, keep_values=quant is not None)
    recipe = lowrank_kit.recipe_from_flags(model=family, method=method, ratio=0.5, quant=quant)
    lowrank_kit.compress(model, recipe, calibration=samples_for(model))
    compressed = greedy(model, inputs)
    assert [(n, type(m)) for n, m in model.named_modules()] != structure
    with snapshot.original() as original:
        assert torch.equal(greedy(original, inputs), want)
    assert torch.equal(greedy(model, inputs), compressed)  # back to compressed after the reference
    snapshot.restore()
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    state, reference = model.state_dict(), fresh.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert model.config.to_dict() == fresh.config.to_dict()
    assert torch.equal(greedy(model, inputs), want)


def test_snapshot_reties_embeddings_that_the_hadamard_rotation_untied():
    import transformers

    from lowrank_kit.models.tiny import tiny_config

    config = tiny_config("qwen3")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM._from_config(config, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = tiny_inputs("qwen3", seed=2)
    want = greedy(model, inputs)
    snapshot = ModelSnapshot(model, keep_values=True)
    recipe = lowrank_kit.recipe_from_flags(model="qwen3", method="svd", ratio=0.5, quant="w8a4")
    lowrank_kit.compress(model, recipe, calibration=samples_for(model))
    assert model.config.tie_word_embeddings is False  # the rotation untied them
    snapshot.restore()
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(greedy(model, inputs), want)
