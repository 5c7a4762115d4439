"""Input hardening: each bad input gives exit code 2 and one `Error:` line naming the problem and the fix,
never a traceback."""

import errno
import json
import os
import shutil

import pytest
from ckpt_helpers import compressed, fails

from lowrank_kit import checkpoint as checkpoint_format
from lowrank_kit.checkpoint import FORMAT_VERSION, save_compressed
from lowrank_kit.models.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {
        "llava": save_tiny_checkpoint("llava", base / "llava"),  # ships a processor
        "qwen2_vl": save_tiny_checkpoint("qwen2_vl", base / "qwen2_vl"),  # no processor
    }


def svd(model, out):
    return ("compress", "--model", model, "--method", "svd", "--ratio", "0.5", "--output", out)


def test_a_hub_id_that_cannot_be_reached_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE is read when huggingface_hub is imported; the module constant is what it consults.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = fails(*svd("nosuch-org/nosuch-model", tmp_path / "o"))
    assert "cannot load model 'nosuch-org/nosuch-model': it is not in the local Hugging Face cache" in line
    assert "download it first (`hf download nosuch-org/nosuch-model`) or pass a local directory" in line


def test_a_local_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    line = fails(*svd(tmp_path / "empty", tmp_path / "o"))
    assert "has no config.json; pass a directory written by save_pretrained" in line


def test_a_truncated_model_weights_file(models, tmp_path):
    model = shutil.copytree(models["qwen2_vl"], tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    line = fails(*svd(model, tmp_path / "o"))
    assert f"weights file '{weights}' is corrupt or truncated" in line
    assert "download or save the model again" in line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_compressed(compressed("qwen2_vl", "svd"), tmp_path_factory.mktemp("ck") / "ckpt")


def test_a_corrupt_compressed_checkpoint(checkpoint, tmp_path):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    line = fails(*svd(ckpt, tmp_path / "o"))
    assert f"checkpoint file '{weights}' is corrupt or truncated (checksum mismatch)" in line


def test_a_checkpoint_from_a_newer_format(checkpoint, tmp_path):
    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["lowrank_config"]["format_version"] = 7
    (ckpt / "config.json").write_text(json.dumps(config))
    line = fails(*svd(ckpt, tmp_path / "o"))
    assert (
        f"format version 7; this lowrank_kit reads up to version {FORMAT_VERSION}: upgrade lowrank_kit"
        in line
    )


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5"])
def test_a_ratio_outside_zero_one(models, tmp_path, ratio):
    line = fails("compress", "--model", models["qwen2_vl"], "--method", "svd", "--ratio", ratio)
    assert f"ratio ρ1 must be in (0, 1] (fraction of parameters kept), got {float(ratio)}" in line


def test_a_rank_larger_than_the_dimension(models, tmp_path):
    line = fails(
        "compress", "--model", models["qwen2_vl"], "--method", "svd", "--rank", "65", "-o", tmp_path / "o"
    )
    assert "rank 65 is impossible for q_proj (64×64): it must be between 1 and 64" in line
    assert not (tmp_path / "o").exists()


def test_a_method_that_needs_calibration_without_a_processor(models, tmp_path):
    line = fails(
        "compress", "--model", models["qwen2_vl"], "--method", "wsvd", "--ratio", "0.5", "-o", tmp_path / "o"
    )
    assert "needs calibration data" in line and "ships its processor" in line


def test_the_api_without_calibration_data():
    import lowrank_kit
    from lowrank_kit.errors import CalibrationError
    from lowrank_kit.models.tiny import build_tiny_model

    recipe = lowrank_kit.recipe_from_flags(model="qwen2_vl", method="svdllm", ratio=0.5)
    with pytest.raises(
        CalibrationError, match="needs calibration data, .* pass `calibration=` samples to compress"
    ):
        lowrank_kit.compress(build_tiny_model("qwen2_vl"), recipe)


def test_an_unsupported_architecture(tmp_path):
    import transformers

    # GPT-2 fuses q, k and v into one c_attn: no adapter claims it.
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    line = fails(*svd(tmp_path / "gpt2", tmp_path / "o"))
    assert (
        "unsupported architecture (model_type 'gpt2', architectures ['GPT2LMHeadModel']); supported:" in line
    )
    assert "qwen2_vl (Qwen2VLForConditionalGeneration" in line


def test_a_full_disk_while_saving(models, tmp_path, monkeypatch):
    def full_disk(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint_format, "save_model", full_disk)
    line = fails(*svd(models["qwen2_vl"], tmp_path / "o"))
    assert "cannot write checkpoint" in line and "no space left on the device" in line
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_without_overwrite(models, tmp_path):
    (tmp_path / "o").mkdir()
    line = fails(*svd(models["qwen2_vl"], tmp_path / "o"))
    assert "already exists; choose another --output or pass --overwrite" in line


def test_no_cache_and_cache_dir_together(models, tmp_path):
    line = fails(*svd(models["qwen2_vl"], tmp_path / "o"), "--no-cache", "--cache-dir", tmp_path / "c")
    assert "--no-cache and --cache-dir contradict each other" in line
