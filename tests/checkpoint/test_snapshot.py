"""ModelSnapshot puts a model compressed in place back as it was: module swaps (decomposers), tensors
rewritten in place (the Hadamard rotation), untied embeddings and the config; and it lends the original
state for a reference forward."""

import pytest
import torch
from ckpt_helpers import greedy, samples_for

import lowrank_kit
from lowrank_kit.models.tiny import build_tiny_model, tiny_inputs
from lowrank_kit.snapshot import ModelSnapshot


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
