"""Tiny models and their processor-free inputs; the tiny LLaVA processor through the chat template."""

import dataclasses

import pytest
import torch
import transformers
from PIL import Image

from lowrank_kit import hookimpl
from lowrank_kit.errors import ModelLoadError, UnknownNameError
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families.common import (
    TINY_IMAGE_TOKEN,
    TINY_PAD,
    chat_template_inputs,
    llama_attention_info,
    tiny_clip_vision,
    tiny_text,
)
from lowrank_kit.models.families.molmo2 import TINY_MOLMO2_IMAGE_PATCH
from lowrank_kit.models.tiny import (
    TINY_FAMILIES,
    build_tiny_model,
    build_tiny_processor,
    family_available,
    tiny_inputs,
)
from lowrank_kit.registry import get_adapter

needs_molmo2 = pytest.mark.skipif(
    not hasattr(transformers, "Molmo2ForConditionalGeneration"), reason="this transformers has no Molmo2"
)


def _same_weights(a, b):
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_seed_decides_the_weights_and_leaves_the_global_rng_alone(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model("llava", seed=0)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    assert _same_weights(a, build_tiny_model("llava", seed=0))
    assert not _same_weights(a, build_tiny_model("llava", seed=1))


def test_dtype_reaches_weights_and_pixels(tiny_model):
    model = tiny_model("qwen2_vl", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inputs = tiny_inputs(model)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert inputs["input_ids"].dtype == torch.long
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.bfloat16


MOLMO2_EXTRA = {"image_token_pooling", "image_grids", "image_num_crops", "mm_token_type_ids"}


@pytest.mark.parametrize(
    ("family", "token", "n_image_tokens", "extra"),
    [
        ("llava", TINY_IMAGE_TOKEN, 4, set()),
        # one 2×2-patch tile: 4 base features + 2 rows of (2 features + 1 newline)
        ("llava_next", TINY_IMAGE_TOKEN, 4 + 2 * 3, {"image_sizes"}),
        ("smolvlm", TINY_IMAGE_TOKEN, 4, {"pixel_attention_mask"}),
        ("qwen2_vl", TINY_IMAGE_TOKEN, 4, {"image_grid_thw", "mm_token_type_ids"}),
        pytest.param("molmo2", TINY_MOLMO2_IMAGE_PATCH, 4, MOLMO2_EXTRA, marks=needs_molmo2),
    ],
)
def test_inputs_carry_the_family_specific_tensors(family, token, n_image_tokens, extra):
    inputs = tiny_inputs(family, batch=3, seed=5)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", *extra}
    ids = inputs["input_ids"]
    assert ids.shape[0] == 3
    assert ((ids == token).sum(dim=1) == n_image_tokens).all()
    assert inputs["attention_mask"].shape == ids.shape and bool(inputs["attention_mask"].all())


def test_inputs_for_a_family_name_match_inputs_for_its_model(tiny_model):
    from_name = tiny_inputs("llava_next", seed=3)
    from_model = tiny_inputs(tiny_model("llava_next"), seed=3)
    assert from_name.keys() == from_model.keys()
    assert all(torch.equal(from_name[k], from_model[k]) for k in from_name)
    assert not torch.equal(from_name["pixel_values"], tiny_inputs("llava_next", seed=4)["pixel_values"])


def test_batch_must_be_positive():
    with pytest.raises(ValueError, match="batch must be at least 1, got 0"):
        tiny_inputs("llava", batch=0)


def test_unknown_family_lists_the_families():
    with pytest.raises(
        UnknownNameError, match="unknown model family 'lava'; available: llama, llava, llava_next"
    ):
        build_tiny_model("lava")


def test_tiny_processor_only_for_llava():
    with pytest.raises(
        ModelLoadError, match="no tiny processor for model family 'qwen2_vl'; available: llava"
    ):
        build_tiny_processor("qwen2_vl")


# -- a plugin's family -----------------------------------------------------------------------------------
def _vipllava_config():
    return transformers.VipLlavaConfig(
        text_config={"model_type": "llama", **tiny_text()},
        vision_config=tiny_clip_vision(8),
        vision_feature_layers=[-2, -1],  # the default reaches 11 layers deep; the tiny tower has 2
        image_token_id=TINY_IMAGE_TOKEN,
        pad_token_id=TINY_PAD,
        tie_word_embeddings=False,
    )


def _vipllava_inputs(config, batch, gen, dtype):
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2  # VipLLaVA drops the CLS feature
    ids = torch.cat(
        [
            torch.randint(4, 200, (batch, 2), generator=gen),
            torch.full((batch, n_image), config.image_token_id),
            torch.randint(4, 200, (batch, 3), generator=gen),
        ],
        dim=1,
    )
    pixels = torch.randn((batch, 3, vision.image_size, vision.image_size), generator=gen).to(dtype)
    return {"input_ids": ids, "pixel_values": pixels}


VIPLLAVA = ModelAdapter(
    name="vipllava",
    display_name="VipLLaVA (test plugin)",
    model_class="VipLlavaForConditionalGeneration",
    model_types=("vipllava",),
    layers="model.language_model.layers",
    language_model="model.language_model",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    attention_info=llama_attention_info,
    tiny_config=_vipllava_config,
    tiny_inputs=_vipllava_inputs,
)


class _AdapterPlugin:
    def __init__(self, adapter):
        self.adapter = adapter

    @hookimpl
    def register_model_adapters(self, register):
        register(self.adapter)


def test_a_plugin_family_gets_a_tiny_model_and_inputs(fresh_registry):
    fresh_registry.add_plugin(_AdapterPlugin(VIPLLAVA), "vipllava-test", "registered in code")
    assert "vipllava" not in TINY_FAMILIES  # the built-in families only
    assert family_available("vipllava")
    model = build_tiny_model("vipllava", seed=1)
    assert type(model).__name__ == "VipLlavaForConditionalGeneration"
    inputs = tiny_inputs(model, batch=2, seed=3)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    from_name = tiny_inputs("vipllava", batch=2, seed=3)
    assert all(torch.equal(inputs[k], from_name[k]) for k in inputs)
    assert ((inputs["input_ids"] == TINY_IMAGE_TOKEN).sum(dim=1) == 4).all()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, 256)
    assert torch.isfinite(logits).all()


def test_a_family_without_tiny_inputs_is_an_error_naming_it(fresh_registry):
    no_inputs = dataclasses.replace(VIPLLAVA, tiny_inputs=None)
    fresh_registry.add_plugin(_AdapterPlugin(no_inputs), "vipllava-test", "registered in code")
    model = build_tiny_model("vipllava")  # the tiny config alone is enough for a model
    with pytest.raises(
        ModelLoadError,
        match=r"no tiny inputs for model family 'vipllava': its adapter sets no tiny_inputs; "
        r"available: llama, llava, llava_next, ",
    ):
        tiny_inputs(model)
    with pytest.raises(ModelLoadError, match="no tiny inputs for model family 'vipllava'"):
        tiny_inputs("vipllava")


def test_tiny_families_are_the_builtin_adapters_with_a_tiny_model():
    assert TINY_FAMILIES == (
        "llava",
        "llava_next",
        "smolvlm",
        "qwen2_vl",
        "qwen2_5_vl",
        "molmo2",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
    )


# -- build_inputs through a real (tiny) processor ------------------------------------------------------
@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("llava")


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (21, 13), (200, 30, 40))


def test_build_inputs_through_the_chat_template(processor, image, tiny_model):
    adapter = get_adapter("llava")
    inputs = adapter.build_inputs(processor, [image], [{"role": "user", "content": "Which color? A or B"}])
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["pixel_values"].shape == (1, 3, 8, 8)
    # 8×8 pixels in 4×4 patches: four image tokens, as many as the vision tower yields.
    assert int((inputs["input_ids"] == TINY_IMAGE_TOKEN).sum()) == 4
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text == "USER: " + "<image>" * 4 + "\nWhich color? A or B ASSISTANT:"
    model = tiny_model("llava")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_build_inputs_without_generation_prompt_when_the_assistant_speaks_last(processor, image):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]
    inputs = chat_template_inputs(processor, [image], messages)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.endswith("ASSISTANT: B</s>") and text.count("ASSISTANT:") == 1


def test_build_inputs_errors(processor, image):
    user = [{"role": "user", "content": "Q"}]
    with pytest.raises(ModelLoadError, match="this model has no processor"):
        chat_template_inputs(None, [image], user)
    with pytest.raises(ValueError, match="message role 'robot' is not one of system, user, assistant"):
        chat_template_inputs(processor, [image], [{"role": "robot", "content": "Q"}])
    with pytest.raises(ValueError, match="needs a user message"):
        chat_template_inputs(processor, [image], [{"role": "system", "content": "S"}])
    with pytest.raises(ValueError, match="at least one message"):
        chat_template_inputs(processor, [image], [])
    bare = build_tiny_processor("llava")
    bare.chat_template = None
    with pytest.raises(ModelLoadError, match="the processor LlavaProcessor has no chat template"):
        chat_template_inputs(bare, [image], user)
