"""The trained testbed: compress → save → from_pretrained → generate gives the same greedy tokens.

The tiny models of the five families are covered by test_checkpoint_roundtrip.py and
tests/quant/test_quant_checkpoint.py; this is the same check on the trained testbed, on real testbed
prompts (with its own processor and calibration data), for every decomposer with and without w8a8.
Uses the testbed of the cache in force ($LOWRANK_KIT_CACHE; CI's main job builds it first).
"""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

import lowrank_kit
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.data.samples import prompt_inputs
from lowrank_kit.data.synthetic import generate_items
from lowrank_kit.surgery import describe_structure

pytestmark = pytest.mark.slow
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def testbed():
    return lowrank_kit.load_model("testbed")


@pytest.fixture(scope="module")
def prompts(testbed):
    items = generate_items("test")[:3]
    return [prompt_inputs(testbed.processor, testbed.adapter, item) for item in items]


def greedy(model, prompts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model.generate(**p, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            for p in prompts
        ]


@pytest.mark.parametrize("quant", [None, "w8a8"])
@pytest.mark.parametrize("method", ["svd", "asvd", "svdllm", "qsvd", "wsvd"])
def test_testbed_reloads_with_the_same_greedy_tokens(method, quant, testbed, prompts, tmp_path):
    loaded = copy.copy(testbed)
    loaded.model = copy.deepcopy(testbed.model)  # each case compresses its own copy in place
    recipe = lowrank_kit.recipe_from_flags(
        model="testbed", method=method, ratio=0.5, quant=quant, calib_samples=8
    )
    result = lowrank_kit.compress(loaded.model, recipe, adapter=loaded.adapter, processor=loaded.processor)
    before = greedy(result.model, prompts)
    out = save_compressed(result, tmp_path / "ckpt", source=loaded.path)

    via_hf = AutoModelForImageTextToText.from_pretrained(out)
    assert describe_structure(via_hf, result.adapter) == result.report["ranks"]
    after = greedy(via_hf, prompts)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    again = lowrank_kit.load(out)
    for a, b in zip(before, greedy(again.model, prompts)):
        assert torch.equal(a, b)
    # the checkpoint ships the testbed's own processor files
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
