"""Each built-in family: the adapter finds every piece of a tiny model, and the model runs and generates."""

import pytest
import torch
import transformers
from torch import nn

from lowrank_kit.errors import ModelLoadError
from lowrank_kit.loading import model_class_for
from lowrank_kit.models.base import get_submodule
from lowrank_kit.models.families import ADAPTERS
from lowrank_kit.models.families.molmo import MOLMO_REMOTE_REASON
from lowrank_kit.models.families.molmo2 import molmo2_missing_message
from lowrank_kit.models.tiny import build_tiny_model, tiny_config, tiny_inputs
from lowrank_kit.registry import adapter_for_config, get_adapter

HAS_MOLMO2 = hasattr(transformers, "Molmo2ForConditionalGeneration")
needs_molmo2 = pytest.mark.skipif(
    not HAS_MOLMO2, reason="this transformers has no Molmo2ForConditionalGeneration"
)
FAMILIES = [
    "llava",
    "llava_next",
    "smolvlm",
    "qwen2_vl",
    "qwen2_5_vl",
    pytest.param("molmo2", marks=needs_molmo2),
]


@pytest.fixture(scope="module")
def models():
    # Built once per module: these tests only read the models.
    return {}


def _model(models, family):
    if family not in models:
        models[family] = build_tiny_model(family)
    return models[family]


def test_every_family_is_registered_through_the_builtin_plugin():
    assert [a.name for a in ADAPTERS] == [
        "llava",
        "llava_next",
        "smolvlm",
        "qwen2_vl",
        "qwen2_5_vl",
        "molmo2",
        "molmo",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
    ]
    for adapter in ADAPTERS:
        assert get_adapter(adapter.name) is adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_piece(models, family):
    model = _model(models, family)
    adapter = adapter_for_config(model.config)
    assert adapter.name == family
    info = adapter.info(model)
    # The tiny config's geometry: GQA 4:2, head_dim 16, hidden 64, 2 layers.
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim) == (
        2,
        64,
        4,
        2,
        16,
    )
    layers = adapter.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == info.num_layers
    for i in range(info.num_layers):
        for target in ("q_proj", "k_proj", "v_proj"):
            proj = adapter.get_projection(model, i, target)
            assert isinstance(proj, nn.Linear)
            assert proj.weight.shape == (info.out_features(target), info.hidden_size)
            assert (proj.bias is not None) == getattr(info, f"{target[0]}_bias")
        o_proj = adapter.get_projection(model, i, "o_proj")
        assert isinstance(o_proj, nn.Linear) and o_proj.weight.shape == (
            info.hidden_size,
            info.num_heads * info.head_dim,
        )
        layer = layers[i]
        for norm in (adapter.input_norm, adapter.post_attention_norm):
            assert get_submodule(layer, norm).weight.shape == (info.hidden_size,)
        assert get_submodule(layer, adapter.mlp["gate_proj"]).in_features == info.hidden_size
        assert get_submodule(layer, adapter.mlp["up_proj"]).in_features == info.hidden_size
        assert get_submodule(layer, adapter.mlp["down_proj"]).out_features == info.hidden_size
    embed = get_submodule(model, adapter.embed_tokens)
    assert isinstance(embed, nn.Embedding) and embed.embedding_dim == info.hidden_size
    assert get_submodule(model, adapter.final_norm).weight.shape == (info.hidden_size,)
    lm_head = get_submodule(model, adapter.lm_head)
    assert isinstance(lm_head, nn.Linear) and lm_head.in_features == info.hidden_size
    assert get_submodule(model, adapter.layers) is get_submodule(model, adapter.language_model).layers
    vision = get_submodule(model, adapter.vision_tower)
    projector = get_submodule(model, adapter.projector)
    # Language, vision tower and projector are distinct parts of the model.
    lm_params = {id(p) for p in get_submodule(model, adapter.language_model).parameters()}
    assert sum(p.numel() for p in vision.parameters()) > 0
    assert sum(p.numel() for p in projector.parameters()) > 0
    assert not lm_params & {id(p) for p in vision.parameters()}
    assert not lm_params & {id(p) for p in projector.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_generate_with_image_inputs(models, family):
    model = _model(models, family)
    inputs = tiny_inputs(model, batch=2)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    single = tiny_inputs(model)
    out = model.generate(**single, max_new_tokens=3, do_sample=False)
    assert (
        out.shape[0] == 1 and single["input_ids"].shape[1] < out.shape[1] <= single["input_ids"].shape[1] + 3
    )
    assert torch.equal(out[:, : single["input_ids"].shape[1]], single["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_change_the_logits(models, family):
    # The image reaches the language model: other pixels give other logits at the last position.
    model = _model(models, family)
    a, b = tiny_inputs(model, seed=0), tiny_inputs(model, seed=0)
    b["pixel_values"] = b["pixel_values"] + 1.0
    with torch.no_grad():
        assert not torch.allclose(model(**a).logits[:, -1], model(**b).logits[:, -1])


def test_rope_kinds_and_qwen_biases():
    llava = get_adapter("llava").info(tiny_config("llava"))
    assert llava.rope.kind == "default" and llava.rope.theta == 10000.0 and llava.rope.mrope_section is None
    assert (llava.q_bias, llava.k_bias, llava.v_bias, llava.qk_norm) == (False, False, False, None)
    qwen = get_adapter("qwen2_vl").info(tiny_config("qwen2_vl"))
    assert qwen.rope.kind == "mrope" and qwen.rope.mrope_section == (2, 3, 3)
    assert sum(qwen.rope.mrope_section) * 2 == qwen.head_dim
    assert (qwen.q_bias, qwen.k_bias, qwen.v_bias) == (True, True, True)


def test_llama_attention_bias_is_read_from_the_config():
    config = tiny_config("llava")
    config.text_config.attention_bias = True
    info = get_adapter("llava").info(config)
    assert (info.q_bias, info.k_bias, info.v_bias) == (True, True, True)
    model = model_class_for(config)._from_config(config)
    assert get_adapter("llava").get_projection(model, 0, "k_proj").bias is not None


def test_head_dim_defaults_to_hidden_over_heads():
    config = tiny_config("llava")
    config.text_config.head_dim = None
    assert get_adapter("llava").info(config).head_dim == 64 // 4


def test_uneven_gqa_is_an_error():
    config = tiny_config("llava")
    config.text_config.num_key_value_heads = 3
    with pytest.raises(ModelLoadError, match="4 query heads, not a multiple of its 3 KV heads"):
        get_adapter("llava").info(config)


def test_missing_rope_theta_is_an_error():
    config = tiny_config("llava")
    config.text_config.rope_parameters = {"rope_type": "default"}
    with pytest.raises(ModelLoadError, match=r"no rope_parameters\['rope_theta'\]"):
        get_adapter("llava").info(config)


@needs_molmo2
@pytest.mark.parametrize(("qk_type", "kind", "width"), [("qwen3", "per_head", 16), ("olmo", "full", 4 * 16)])
def test_molmo2_qk_norm_kind_matches_the_norm_module(qk_type, kind, width):
    config = tiny_config("molmo2")
    config.text_config.qk_norm_type = qk_type
    adapter = get_adapter("molmo2")
    assert adapter.info(config).qk_norm == kind
    model = model_class_for(config)._from_config(config)
    assert adapter.attention_module(model, 0).q_norm.weight.shape == (width,)


@needs_molmo2
def test_molmo2_norm_after_and_scaled_rope_layers():
    adapter = get_adapter("molmo2")
    config = tiny_config("molmo2")
    assert adapter.norm_after(config) is False
    config.text_config.norm_after = True
    assert adapter.norm_after(config) is True
    config.text_config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    config.text_config.rope_scaling_layers = [1]
    assert adapter.info(config).rope.parameters["rope_scaling_layers"] == [1]


@needs_molmo2
def test_molmo2_bad_qk_norm_type_is_an_error():
    config = tiny_config("molmo2")
    config.text_config.qk_norm_type = "layer"
    with pytest.raises(ModelLoadError, match="qk_norm_type 'layer'; supported: olmo, qwen3"):
        get_adapter("molmo2").info(config)


@pytest.mark.skipif(HAS_MOLMO2, reason="this transformers has Molmo2; the missing-class error cannot happen")
def test_molmo2_on_an_old_transformers_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="needs transformers.Molmo2ForConditionalGeneration"):
        tiny_config("molmo2")
    assert "upgrade transformers" in molmo2_missing_message()


def test_remote_code_molmo_is_recognised_and_refused():
    config = {"model_type": "molmo", "architectures": ["MolmoForCausalLM"]}
    with pytest.raises(ModelLoadError, match="fuses q, k and v into one `att_proj`"):
        adapter_for_config(config)
    assert "molmo2-8b" in MOLMO_REMOTE_REASON
    with pytest.raises(ModelLoadError, match="no tiny config"):
        build_tiny_model("molmo")


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(
        ModelLoadError,
        match=r"unsupported architecture \(model_type 'bert'.*supported: llama \(LlamaForCausalLM.*llava \(",
    ):
        adapter_for_config({"model_type": "bert", "architectures": ["BertModel"]})


def test_smolvlm_adapter_also_claims_idefics3():
    # HuggingFaceTB/SmolVLM-Instruct is saved as an Idefics3 model with the same module layout.
    data = tiny_config("smolvlm").to_dict()
    del data["model_type"]
    config = transformers.Idefics3Config(**data)
    assert config.model_type == "idefics3"
    assert adapter_for_config(config).name == "smolvlm"
    model = model_class_for(config)._from_config(config)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert isinstance(get_adapter("smolvlm").get_projection(model, 1, "v_proj"), nn.Linear)
