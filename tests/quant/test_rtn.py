"""rtn on every decomposer's output: what is quantized, how, and what it does to the logits."""

import pytest
import torch
from quant_helpers import DECOMPOSERS, decompose, logits, quantize, rel, tiny

from lowrank_kit.errors import LowRankError
from lowrank_kit.models.tiny import tiny_inputs
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.quant.modules import HadamardInput, QuantLinear, QuantPerHeadLowRankLinear
from lowrank_kit.quant.primitives import fake_quant_groups


def _error(family, method, scheme, methods=None):
    model = tiny(family)
    if method:
        decompose(model, family, method)
    inputs = tiny_inputs(model, seed=9)
    before = logits(model, inputs)
    result = quantize(model, family, scheme, methods=methods)
    return rel(logits(model, inputs), before), result


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", [None, *DECOMPOSERS])
def test_w8a8_changes_logits_far_less_than_w4a4_without_rotation(family, method):
    small, result = _error(family, method, "w8a8")
    large, _ = _error(family, method, "w4a4", methods=["rtn"])
    # 4-bit steps are 127/7 ≈ 18× coarser than 8-bit ones; the errors observed differ by 10-20×.
    assert small * 4 < large
    assert result.report["quant"] == "w8a8"
    assert result.report["quantize"]["methods"] == ["hadamard", "rtn"]


def _linears(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("method", [None, *DECOMPOSERS])
def test_every_language_model_linear_is_quantized_lm_head_and_vision_are_not(method):
    model = tiny("llava")
    if method:
        decompose(model, "llava", method)
    vision_before = {n: p.clone() for n, p in model.model.vision_tower.named_parameters()}
    head_before = model.lm_head.weight.clone()
    result = quantize(model, "llava", "w4a4", methods=["rtn"])
    assert _linears(model.model.language_model) == []  # the factors' linears included
    attn = model.model.language_model.layers[0].self_attn
    for t in ("q_proj", "k_proj", "v_proj"):
        mod = getattr(attn, t)
        if isinstance(mod, LowRankLinear):
            assert isinstance(mod.down, QuantLinear) and isinstance(mod.up, QuantLinear)
        elif isinstance(mod, JointLowRankProjection):
            assert isinstance(mod.shared.down, QuantLinear) and isinstance(mod.up, QuantLinear)
        elif isinstance(mod, PerHeadLowRankLinear):
            assert isinstance(mod, QuantPerHeadLowRankLinear) and isinstance(mod.down, QuantLinear)
            assert mod.up_qweight.dtype == torch.uint8  # packed int4
        else:
            assert isinstance(mod, QuantLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and torch.equal(model.lm_head.weight, head_before)
    for n, p in model.model.vision_tower.named_parameters():
        assert torch.equal(p, vision_before[n]), n
    report = result.report["quantize"]["rtn"]
    assert report["weight_bits"] == 4 and report["act_bits"] == 4 and report["kv_bits"] is None
    assert 0 < report["weight_relative_error"] < 0.5


def test_the_vision_tower_is_quantized_on_request():
    model = tiny("llava")
    quantize(model, "llava", "w8a8", methods=["rtn"], params={"rtn": {"vision": True}})
    assert _linears(model.model.vision_tower) == [] and _linears(model.model.multi_modal_projector) == []
    vision = [m for m in model.model.vision_tower.modules() if isinstance(m, QuantLinear)]
    assert vision and all(m.input_quant.clip == 0.9 for m in vision)
    assert model.model.language_model.layers[0].mlp.up_proj.input_quant.clip == 1.0


def test_activation_and_weight_specs_follow_the_scheme():
    model = tiny("llava")
    decompose(model, "llava", "svd")
    quantize(model, "llava", "w8a16")
    attn = model.model.language_model.layers[0].self_attn
    assert attn.q_proj.down.weight_bits == 8 and attn.q_proj.down.input_quant is None
    model = tiny("llava")
    quantize(model, "llava", "w8a4", params={"rtn": {"act_clip": 0.8}})
    down = model.model.language_model.layers[0].mlp.down_proj
    assert isinstance(down, HadamardInput)  # the rotated input is what gets quantized
    assert down.linear.input_quant.bits == 4 and down.linear.input_quant.clip == 0.8


def _kv_module_inputs(model, layer, target):
    """The (latent, module output) a K/V projection produces on an input batch."""
    seen = {}
    mod = getattr(model.model.language_model.layers[layer].self_attn, target)
    hooks = [mod.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.detach()))]
    if isinstance(mod, PerHeadLowRankLinear):
        hooks.append(
            mod.down.register_forward_hook(lambda m, a, out: seen.__setitem__("latent", out.detach()))
        )
    elif isinstance(mod, LowRankLinear | JointLowRankProjection):
        hooks.append(mod.up.register_forward_pre_hook(lambda m, a: seen.__setitem__("up_in", a[0].detach())))
        latent_mod = mod.down if isinstance(mod, LowRankLinear) else mod.shared.down
        hooks.append(
            latent_mod.register_forward_hook(lambda m, a, out: seen.__setitem__("latent", out.detach()))
        )
    logits(model, tiny_inputs(model, seed=4))
    for h in hooks:
        h.remove()
    return mod, seen


@pytest.mark.parametrize("kv", [8, 4])
@pytest.mark.parametrize("method", [None, "svd", "qsvd", "wsvd"])
def test_kv_latents_are_fake_quantized_per_token_and_group(method, kv):
    model = tiny("qwen2_vl")
    if method:
        decompose(model, "qwen2_vl", method)
    result = quantize(model, "qwen2_vl", f"w8a8-kv{kv}")
    for target in ("k_proj", "v_proj"):
        mod, seen = _kv_module_inputs(model, 1, target)
        assert mod.kv_bits == kv
        if isinstance(mod, QuantPerHeadLowRankLinear):
            expected = mod.up(fake_quant_groups(seen["latent"], tuple(mod.ranks), kv))
            assert torch.equal(seen["out"], expected)
            assert mod.up_input_quant.groups == tuple(mod.ranks)
        elif isinstance(mod, LowRankLinear | JointLowRankProjection):
            spec = mod.up.input_quant
            assert spec.bits == kv and spec.groups == (mod.rank,)
            assert torch.equal(seen["up_in"], seen["latent"])
            mod.up.input_quant = None
            expected = mod.up(fake_quant_groups(seen["latent"], (mod.rank,), kv))
            mod.up.input_quant = spec
            assert torch.equal(seen["out"], expected)
        else:  # the full K/V of an uncompressed model, one group per KV head
            d = result.adapter.info(model).head_dim
            assert torch.equal(seen["out"], fake_quant_groups(seen["out"], (d,) * 2, kv))
    q = model.model.language_model.layers[1].self_attn.q_proj
    assert getattr(q, "kv_bits", None) is None
    report = result.report["quantize"]
    assert report["kv_bits"] == kv and report["cache_bits"] == kv
    assert report["cache_ratio_vs_fp16"] == pytest.approx(result.report["rho2"] * kv / 16)
    assert report["cache_ratio_vs_fp16_with_scales"] > report["cache_ratio_vs_fp16"]


def test_cache_ratio_without_latent_bits_is_rho2():
    model = tiny("llava")
    decompose(model, "llava", "wsvd", ratio=0.5)
    result = quantize(model, "llava", "w8a8")
    q = result.report["quantize"]
    assert q["cache_bits"] == 16 and q["cache_ratio_vs_fp16"] == pytest.approx(result.report["rho2"])
    # Quantized weights still count as parameters in the report.
    assert result.report["params_after"] > 0.5 * result.report["params_before"]


def test_quantizing_twice_is_an_error():
    model = tiny("llava")
    quantize(model, "llava", "w8a16")
    with pytest.raises(LowRankError, match=r"rtn: the model is already quantized \(.*QuantLinear\)"):
        quantize(model, "llava", "w8a16")


def test_a_quantized_model_moved_to_fp16_computes_in_fp16():
    """model.to(float16) after quantization: the integer weights unpack to fp16 like the activations
    (they stayed fp32 before, and the first fp16 forward failed with a dtype mismatch)."""
    model = tiny("llava")
    decompose(model, "llava", "wsvd")
    quantize(model, "llava", "w8a8")
    inputs = tiny_inputs(model, seed=9)
    ref = logits(model, inputs)
    quant = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantPerHeadLowRankLinear))]
    assert any(isinstance(m, QuantPerHeadLowRankLinear) for m in quant)
    model.to(torch.float16)
    assert {m.compute_dtype for m in quant} == {torch.float16}
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**half).logits
    assert out.dtype == torch.float16
    assert rel(out.float(), ref) < 2e-2  # fp16 rounding of a w8a8 model
    model.float()  # back to fp32 (the fp16 round trip rounded the float weights and scales)
    assert {m.compute_dtype for m in quant} == {torch.float32}
    assert rel(logits(model, inputs), ref) < 2e-2
