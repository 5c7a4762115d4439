"""The flat-spectrum constraint the small testbed trains its Q/K/V under (TrainSettings.flat_qkv)."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lowrank_kit.errors import LowRankError
from lowrank_kit.testbed.train import FlatSpectrum, constrain_flat_spectrum, release_flat_spectrum


def test_every_head_has_one_singular_value():
    torch.manual_seed(0)
    weight = torch.randn(96, 40) * 0.05
    flat = FlatSpectrum(weight, head_dim=32)
    with torch.no_grad():
        flat.log_scale.copy_(torch.tensor([0.0, 0.5, -1.0]).log1p())
    out = flat(weight)
    for h, expected in enumerate(torch.tensor([0.0, 0.5, -1.0]).log1p().exp()):
        s = torch.linalg.svdvals(out[h * 32 : (h + 1) * 32])
        torch.testing.assert_close(s, torch.full_like(s, float(expected)), rtol=1e-5, atol=1e-6)
    # The initial scale is the weights' mean row norm, unless one is given.
    rows = weight.view(3, 32, 40).norm(dim=-1).mean(dim=-1)
    torch.testing.assert_close(FlatSpectrum(weight, 32).log_scale.exp(), rows)
    torch.testing.assert_close(FlatSpectrum(weight, 32, scale=1.0).log_scale.exp(), torch.ones(3))


def test_a_weight_that_is_not_whole_heads_is_refused():
    with pytest.raises(LowRankError, match="not whole heads of 32"):
        FlatSpectrum(torch.randn(40, 16), head_dim=32)


def test_constrain_then_release_leaves_a_plain_model_with_the_constrained_weights(tiny_model):
    from lowrank_kit.models.tiny import tiny_inputs

    model = tiny_model("llava")
    constrain_flat_spectrum(model)
    projections = [
        getattr(layer.self_attn, n)
        for layer in model.model.language_model.layers
        for n in ("q_proj", "k_proj", "v_proj")
    ]
    assert all(parametrize.is_parametrized(m, "weight") for m in projections)
    constrained = [m.weight.detach().clone() for m in projections]
    inputs = tiny_inputs(model, seed=1)
    with torch.no_grad():
        before = model(**inputs).logits
    release_flat_spectrum(model)
    assert not any(parametrize.is_parametrized(m, "weight") for m in projections)
    assert all(isinstance(m.weight, nn.Parameter) for m in projections)
    for m, w in zip(projections, constrained):
        torch.testing.assert_close(m.weight, w)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before)
    assert not any("parametrizations" in k for k in model.state_dict())
