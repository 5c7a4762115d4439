"""The decode-attention benchmark's shapes: read from the presets, and equal to its built-in table."""

import pytest

from lowrank_kit.errors import UnknownNameError
from lowrank_kit.kernels.latent_attention.bench import MODELS, attention_shape


@pytest.mark.parametrize("alias", sorted(MODELS))
def test_built_in_shapes_are_the_presets(alias):
    assert {k: v for k, v in attention_shape(alias).items() if k != "qk_norm"} == MODELS[alias]
    assert attention_shape(alias)["qk_norm"] is None


def test_shape_of_a_qk_norm_gqa_preset():
    assert attention_shape("molmo2-8b") == dict(
        num_heads=32, num_kv_heads=8, head_dim=128, bias=False, mrope_section=None, qk_norm="per_head"
    )


def test_unknown_alias():
    with pytest.raises(UnknownNameError, match=r"unknown model alias 'llava'; available: .*llava-next-7b"):
        attention_shape("llava")
