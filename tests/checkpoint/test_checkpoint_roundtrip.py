"""compress → save → from_pretrained / lowrank_kit.load → generate gives the same greedy tokens."""

import json

import pytest
import torch
from ckpt_helpers import DECOMPOSERS, FAMILIES, compressed, greedy, hf_auto_class
from transformers import AutoModelForImageTextToText

import lowrank_kit
from lowrank_kit.checkpoint import FORMAT_VERSION, save_compressed
from lowrank_kit.models.tiny import tiny_inputs
from lowrank_kit.surgery import describe_structure


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", DECOMPOSERS)
def test_reloaded_model_generates_the_same_tokens(family, method, tmp_path):
    result = compressed(family, method)
    inputs = tiny_inputs(result.model, seed=7)
    before = greedy(result.model, inputs)
    out = save_compressed(result, tmp_path / "ckpt")

    via_hf = hf_auto_class(result.adapter).from_pretrained(out)
    assert type(via_hf) is type(result.model)
    assert describe_structure(via_hf, result.adapter) == result.report["ranks"]
    assert torch.equal(greedy(via_hf, inputs), before)

    loaded = lowrank_kit.load(out)
    assert torch.equal(greedy(loaded.model, inputs), before)
    # Every weight, not only the generated tokens: the file holds exactly what was compressed.
    reference = result.model.state_dict()
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_shared_latents_stay_shared_after_from_pretrained(tmp_path):
    result = compressed("qwen2_vl", "qsvd")
    out = save_compressed(result, tmp_path / "ckpt")
    model = AutoModelForImageTextToText.from_pretrained(out)
    attn = model.model.language_model.layers[1].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    ref = result.model.model.language_model.layers[1].self_attn.q_proj.shared.down.weight
    assert torch.equal(attn.v_proj.shared.down.weight, ref)


def test_checkpoint_layout(tmp_path):
    from lowrank_kit.models.tiny import build_tiny_processor

    result = compressed("llava", "wsvd", ratio=0.5)
    result.processor = build_tiny_processor("llava")
    out = save_compressed(result, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    block = config["lowrank_config"]
    assert block["format_version"] == FORMAT_VERSION
    assert block["recipe"] == result.recipe.to_dict()
    assert block["structure"] == result.report["ranks"]
    assert len(block["structure"]["0"]["k_proj"]["ranks"]) == 2  # per KV head
    assert config["quantization_config"] == {"quant_method": "lowrank", "format_version": FORMAT_VERSION}
    assert config["model_type"] == "lowrank_kit" and block["base_model_type"] == "llava"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "lowrank_manifest.json", "lowrank_report.json", "recipe.yaml"} <= names
    assert {"tokenizer.json", "processor_config.json"} & names, names
    # No pickle anywhere: nothing but safetensors, JSON, YAML and text.
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    manifest = json.loads((out / "lowrank_manifest.json").read_text())
    assert set(manifest) == names - {"lowrank_manifest.json"}
    # No temporary directory is left beside the checkpoint.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_size_on_disk_follows_rho1(tmp_path):
    result = compressed("llava", "svd", ratio=0.5)
    out = save_compressed(result, tmp_path / "ckpt")
    report = json.loads((out / "lowrank_report.json").read_text())
    assert report["disk_bytes"] == (out / "model.safetensors").stat().st_size
    # fp32: the file shrinks by exactly the parameters the factors saved, plus a JSON header (< 64 KiB).
    saved = (report["replaced_params"] - report["factor_params"]) * 4
    assert report["weight_bytes"] == report["original_weight_bytes"] - saved
    assert 0 < report["disk_bytes"] - report["weight_bytes"] < 64 * 1024
    assert report["disk_ratio"] == pytest.approx(report["disk_bytes"] / report["original_weight_bytes"])
    assert report["disk_ratio"] < 1.0
    assert report["checkpoint_bytes"] > report["disk_bytes"]


def test_load_model_recognises_a_compressed_directory(tmp_path):
    from lowrank_kit.loading import load_model

    result = compressed("smolvlm", "svd")
    out = save_compressed(result, tmp_path / "ckpt")
    loaded = load_model(str(out))
    assert describe_structure(loaded.model, loaded.adapter) == result.report["ranks"]
