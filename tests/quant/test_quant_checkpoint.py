"""Quantized checkpoints: int8 / packed int4 on disk, rebuilt bit-exactly by from_pretrained and load."""

import json

import pytest
import torch
from quant_helpers import DECOMPOSERS, FAMILIES, decompose, hf_auto_class, quantize, samples, tiny
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

import lowrank_kit
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.cli.main import app
from lowrank_kit.errors import CheckpointError
from lowrank_kit.models.tiny import save_tiny_checkpoint, tiny_inputs
from lowrank_kit.quant.modules import QuantLinear
from lowrank_kit.quant.structure import quantized_structure
from lowrank_kit.recipe import parse_recipe

NEW_TOKENS = 6


def greedy(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def compressed(family, method, scheme):
    model = tiny(family)
    steps = [{"type": "decompose", "method": method, "ratio": 0.6}] if method else []
    steps.append({"type": "quantize", "scheme": scheme})
    return lowrank_kit.compress(
        model, parse_recipe({"model": family, "steps": steps}), calibration=samples(model)
    )


def _round_trip(result, tmp_path):
    inputs = tiny_inputs(result.model, seed=7)
    before = greedy(result.model, inputs)
    out = save_compressed(result, tmp_path / "ckpt")
    reference = result.model.state_dict()
    via_hf = hf_auto_class(result.adapter).from_pretrained(out)
    loaded = lowrank_kit.load(out)
    for model in (via_hf, loaded.model):
        assert quantized_structure(model) == quantized_structure(result.model)
        state = model.state_dict()
        assert set(state) == set(reference)
        for name, value in state.items():  # integers, scales and Hadamard factors bit for bit
            assert value.dtype == reference[name].dtype and torch.equal(value, reference[name]), name
        assert torch.equal(greedy(model, inputs), before)
    return out


def _params(families, methods):
    # The whole grid runs in CI (slow); LLaVA with every decomposer is the fast subset.
    out = []
    for fam in families:
        for method in methods:
            marks = [] if fam.values[0] == "llava" else [pytest.mark.slow]
            out.append(pytest.param(fam.values[0], method, marks=[*fam.marks, *marks]))
    return out


@pytest.mark.parametrize(("family", "method"), _params(FAMILIES, [None, *DECOMPOSERS]))
def test_w8a8_checkpoints_reload_with_the_same_tokens(family, method, tmp_path):
    result = compressed(family, method, "w8a8")
    out = _round_trip(result, tmp_path)
    block = json.loads((out / "config.json").read_text())["lowrank_config"]
    assert block["quantization"] == "w8a8"
    assert block["quantized_modules"] == quantized_structure(result.model)


@pytest.mark.parametrize("scheme", ["w4a4-kv4", "w8a8-kv8", "w4a16"])
@pytest.mark.parametrize("method", ["wsvd", "qsvd", None])
def test_int4_and_latent_bits_round_trip(scheme, method, tmp_path):
    result = compressed("qwen2_vl", method, scheme)
    _round_trip(result, tmp_path)


def test_untied_embeddings_stay_untied_after_reload(tmp_path):
    from lowrank_kit.loading import model_class_for
    from lowrank_kit.models.tiny import tiny_config

    config = tiny_config("llava")
    config.tie_word_embeddings = True
    config.get_text_config().tie_word_embeddings = True
    torch.manual_seed(0)
    model = model_class_for(config)._from_config(config, dtype=torch.float32).eval()
    result = lowrank_kit.compress(
        model, parse_recipe({"model": "llava", "steps": [{"type": "quantize", "scheme": "w8a8"}]})
    )
    out = _round_trip(result, tmp_path)
    reloaded = hf_auto_class(result.adapter).from_pretrained(out)
    assert reloaded.lm_head.weight is not reloaded.model.language_model.embed_tokens.weight


def _quantized_elements(model):
    """Weight elements stored as integers (independently of the modules' own bookkeeping)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.out_features * mod.in_features
        elif hasattr(mod, "up_qweight"):
            total += mod.head_dim * sum(mod.ranks)
    return total


@pytest.mark.parametrize("method", ["svd", "wsvd"])
def test_size_on_disk_follows_rho1_and_the_bits(method, tmp_path):
    float_model = tiny("llava")
    float_result = decompose(float_model, "llava", method, ratio=0.5)
    save_compressed(float_result, tmp_path / "float")
    float_bytes = float_result.report["disk_bytes"]
    sizes = {}
    for bits in (8, 4):
        model = tiny("llava")
        decompose(model, "llava", method, ratio=0.5)
        # rtn alone (no rotation): the only change to the file is the quantized weights.
        result = quantize(model, "llava", f"w{bits}a16", methods=["rtn"])
        save_compressed(result, tmp_path / f"w{bits}")
        report = result.report
        n = _quantized_elements(model)
        channels = sum(
            m.out_features if isinstance(m, QuantLinear) else m.up_scale.numel()
            for m in model.modules()
            if isinstance(m, QuantLinear) or hasattr(m, "up_scale")
        )
        # fp32 weights become `bits`-bit integers plus one fp32 scale per output channel (int4 rows of
        # odd width carry half a byte of padding each); the JSON header differs by under 64 KiB.
        expected = float_bytes - 4 * n + n * bits // 8 + 4 * channels
        assert abs(report["disk_bytes"] - expected) < 64 * 1024 + channels
        assert report["rho1"] == pytest.approx(float_result.report["rho1"])
        sizes[bits] = report["disk_bytes"]
    assert sizes[4] < sizes[8] < float_bytes


def test_a_damaged_quantized_structure_is_a_checkpoint_error(tmp_path):
    result = compressed("llava", "svd", "w8a8")
    out = save_compressed(result, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    path = next(iter(config["lowrank_config"]["quantized_modules"]))
    config["lowrank_config"]["quantized_modules"][path]["kind"] = "mystery"
    (out / "config.json").write_text(json.dumps(config))
    (out / "lowrank_manifest.json").unlink()  # so that the structure, not the checksum, is what fails
    with pytest.raises(
        CheckpointError,
        match=r"quantized_modules of this checkpoint are invalid: .*unknown quantized module kind 'mystery'",
    ):
        AutoModelForImageTextToText.from_pretrained(out)


def test_cli_compress_reports_the_scheme_and_the_cache_size(tmp_path):
    src = save_tiny_checkpoint("llava", tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["compress", "--model", str(src), "--method", "svd", "--ratio", "0.5", "--quant", "w8a8-kv8"]
    res = CliRunner().invoke(
        app, [*args, "--output", str(out), "--json", "--no-cache"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["quant"] == "w8a8-kv8"
    assert data["cache_ratio_vs_fp16"] == pytest.approx(data["rho2"] * 8 / 16)
    report = json.loads((out / "lowrank_report.json").read_text())
    assert report["quantize"]["scheme"] == "w8a8-kv8" and report["quantize"]["weight_bits"] == 8
    loaded = lowrank_kit.load(out)
    assert loaded.model.model.language_model.layers[0].self_attn.k_proj.kv_bits == 8
