"""A loaded W8A8 / W4A16 checkpoint holds its integers, not a float copy of them (issue 22): the bytes of
every tensor the model keeps (parameters, buffers, tensors in module attributes) are the same before and
after a forward, and the quantized projections hold 1 (or ½) byte per weight."""

import pytest
import torch
from ckpt_helpers import compressed

import lowrank_kit
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.models.tiny import tiny_inputs
from lowrank_kit.quant.modules import QuantLinear
from lowrank_kit.quant.report import held_tensor_bytes as tensor_bytes


@pytest.mark.parametrize("quant,bits", [("w8a8", 8), ("w4a16", 4)])
def test_a_loaded_quantized_checkpoint_keeps_no_float_copy(tmp_path, quant, bits):
    path = save_compressed(compressed("llama", "svdllm", quant=quant), tmp_path / "ckpt")
    model = lowrank_kit.load(path).model
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quantized, "the recipe quantized nothing"
    for m in quantized:
        assert m.qweight.numel() * m.qweight.element_size() == m.out_features * -(-m.in_features * bits // 8)
    before = tensor_bytes(model)
    with torch.no_grad():
        model(**tiny_inputs(model, seed=1))
        model.generate(**tiny_inputs(model, seed=2), max_new_tokens=3, do_sample=False)
    assert tensor_bytes(model) == before
