"""Architecture presets: the documented shapes of the real checkpoints, built without downloading."""

import pytest
import torch
import transformers

from lowrank_kit.errors import ModelLoadError, UnknownNameError
from lowrank_kit.models.presets import PRESETS, build_random_model, get_preset, preset_config
from lowrank_kit.registry import adapter_for_config, get_adapter

HAS_MOLMO2 = hasattr(transformers, "Molmo2ForConditionalGeneration")
needs_molmo2 = pytest.mark.skipif(
    not HAS_MOLMO2, reason="this transformers has no Molmo2ForConditionalGeneration"
)
ALIASES = [pytest.param(a, marks=needs_molmo2) if PRESETS[a].family == "molmo2" else a for a in PRESETS]


def test_the_aliases_of_the_issue_exist():
    expected = {
        "smolvlm": "HuggingFaceTB/SmolVLM-Instruct",
        "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
        "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
        "llava-next-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-next-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
        "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
        "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
        "molmo2-8b": "allenai/Molmo2-8B",
    }
    assert {a: p.hub_id for a, p in PRESETS.items()} == expected


@pytest.mark.parametrize("alias", ALIASES)
def test_each_preset_is_recognised_as_its_family(alias):
    config = preset_config(alias)
    assert adapter_for_config(config).name == PRESETS[alias].family
    info = get_adapter(PRESETS[alias].family).info(config)
    assert info.num_heads % info.num_kv_heads == 0


@pytest.mark.parametrize(
    ("alias", "layers", "hidden", "heads", "kv_heads", "head_dim"),
    [
        ("llava-1.5-7b", 32, 4096, 32, 32, 128),
        ("llava-1.5-13b", 40, 5120, 40, 40, 128),
        ("llava-next-7b", 32, 4096, 32, 32, 128),
        ("smolvlm", 24, 2048, 32, 32, 64),
        ("qwen2-vl-7b", 28, 3584, 28, 4, 128),
        ("qwen2.5-vl-7b", 28, 3584, 28, 4, 128),
        pytest.param("molmo2-8b", 36, 4096, 32, 8, 128, marks=needs_molmo2),
    ],
)
def test_documented_geometry(alias, layers, hidden, heads, kv_heads, head_dim):
    info = get_adapter(PRESETS[alias].family).info(preset_config(alias))
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim) == (
        layers,
        hidden,
        heads,
        kv_heads,
        head_dim,
    )


def test_documented_rope_bias_and_vision_numbers():
    qwen = get_adapter("qwen2_vl").info(preset_config("qwen2-vl-7b"))
    assert qwen.rope.kind == "mrope" and qwen.rope.mrope_section == (16, 24, 24) and qwen.rope.theta == 1e6
    assert qwen.q_bias and qwen.k_bias and qwen.v_bias
    llava = preset_config("llava-1.5-7b")
    assert llava.image_token_id == 32000 and llava.text_config.vocab_size == 32064
    assert (llava.vision_config.image_size, llava.vision_config.patch_size) == (336, 14)
    assert llava.vision_feature_layer == -2
    smol = preset_config("smolvlm")
    assert smol.model_type == "idefics3" and smol.scale_factor == 3 and smol.image_token_id == 49153
    # 384 px in 14 px patches is 27×27; the pixel shuffle by 3 leaves 81 tokens per image tile.
    side = smol.vision_config.image_size // smol.vision_config.patch_size
    assert side * side // smol.scale_factor**2 == 81


@needs_molmo2
def test_molmo2_preset_has_per_head_qk_norm():
    info = get_adapter("molmo2").info(preset_config("molmo2-8b"))
    assert info.qk_norm == "per_head" and not info.q_bias


# Parameter counts published for these checkpoints (safetensors totals on their hub pages); building the
# preset on the meta device must reproduce them exactly, which checks every width, layer and vocabulary.
PUBLISHED_PARAMS = {
    "llava-1.5-7b": 7_063_427_072,
    "smolvlm": 2_246_272_880,
    "qwen2-vl-7b": 8_291_375_616,
    "qwen2.5-vl-7b": 8_292_166_656,
}


@pytest.mark.parametrize("alias", sorted(PUBLISHED_PARAMS))
def test_random_model_on_meta_has_the_published_parameter_count(alias):
    model = build_random_model(alias, device="meta")
    assert model.num_parameters() == PUBLISHED_PARAMS[alias]
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(UnknownNameError, match="unknown model alias 'llava-7b'; available: llava-1.5-13b"):
        get_preset("llava-7b")


@pytest.mark.skipif(HAS_MOLMO2, reason="this transformers has Molmo2; the missing-class error cannot happen")
def test_molmo2_preset_on_an_old_transformers_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="needs transformers.Molmo2ForConditionalGeneration"):
        preset_config("molmo2-8b")
