"""Every way a checkpoint can be unusable gives one line naming the problem, through both loaders."""

import hashlib
import json

import pytest
from ckpt_helpers import compressed
from transformers import AutoModelForImageTextToText

import lowrank_kit
from lowrank_kit.checkpoint import FORMAT_VERSION, save_compressed
from lowrank_kit.errors import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_compressed(compressed("qwen2_vl", "svd"), tmp_path_factory.mktemp("ok") / "ckpt")


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of a good checkpoint that the test may damage."""
    import shutil

    return shutil.copytree(saved, tmp_path / "ckpt")


def both_loaders():
    return [
        pytest.param(lambda p: lowrank_kit.load(p), id="lowrank_kit.load"),
        pytest.param(lambda p: AutoModelForImageTextToText.from_pretrained(p), id="from_pretrained"),
    ]


def rewrite_config(ckpt, edit):
    """Edit config.json and refresh its checksum, as if a newer or different writer had produced it."""
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    manifest = json.loads((ckpt / "lowrank_manifest.json").read_text())
    manifest["config.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (ckpt / "lowrank_manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("load", both_loaders())
def test_a_flipped_byte_names_the_corrupt_file(ckpt, load):
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is corrupt or truncated \(checksum"):
        load(ckpt)


@pytest.mark.parametrize("load", both_loaders())
def test_a_truncated_file_names_the_file(ckpt, load):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is corrupt or truncated"):
        load(ckpt)


def test_a_truncated_file_without_manifest_is_still_named(ckpt):
    # A directory written by save_pretrained has no manifest; the header check still names the file.
    (ckpt / "lowrank_manifest.json").unlink()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is corrupt or truncated"):
        AutoModelForImageTextToText.from_pretrained(ckpt)


@pytest.mark.parametrize("load", both_loaders())
def test_a_newer_format_version_asks_for_an_upgrade(ckpt, load):
    def newer(config):
        config["lowrank_config"]["format_version"] = 99
        config["quantization_config"]["format_version"] = 99

    rewrite_config(ckpt, newer)
    with pytest.raises(
        CheckpointError,
        match=f"format version 99; this lowrank_kit reads up to version {FORMAT_VERSION}: upgrade",
    ):
        load(ckpt)


@pytest.mark.parametrize("load", both_loaders())
def test_a_format_1_checkpoint_with_the_models_own_type_still_loads(ckpt, load):
    base = []

    def format_1(config):
        base.append(config["lowrank_config"].pop("base_model_type"))
        config["model_type"] = base[0]
        del config["lowrank_kit_guard"]
        config["lowrank_config"]["format_version"] = 1
        config["quantization_config"]["format_version"] = 1

    rewrite_config(ckpt, format_1)
    model = load(ckpt)
    model = getattr(model, "model", model)
    assert model.config.model_type == base[0] != "lowrank_kit"


@pytest.mark.parametrize("load", both_loaders())
def test_a_lowrank_kit_type_without_its_base_type_is_named(ckpt, load):
    rewrite_config(ckpt, lambda config: config["lowrank_config"].pop("base_model_type"))
    with pytest.raises(
        CheckpointError, match="model_type 'lowrank_kit' but no lowrank_config.base_model_type"
    ):
        load(ckpt)


def test_a_missing_weights_file_is_named(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file '.*model\.safetensors' is missing"):
        lowrank_kit.load(ckpt)
    # transformers looks for the weights before any quantizer runs, and says so itself.
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForImageTextToText.from_pretrained(ckpt)


def test_a_missing_tokenizer_file_is_named(saved, tmp_path):
    import shutil

    from lowrank_kit.models.tiny import build_tiny_processor

    result = compressed("llava", "svd")
    result.processor = build_tiny_processor("llava")
    out = save_compressed(result, tmp_path / "with-processor")
    victim = next(p for p in ("tokenizer.json", "tokenizer_config.json") if (out / p).exists())
    (out / victim).unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file '.*{victim}' is missing"):
        lowrank_kit.load(out)
    shutil.rmtree(out)


def test_no_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing; pass the directory"):
        lowrank_kit.load(ckpt)


def test_a_corrupt_config_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen2_vl", ')
    with pytest.raises(CheckpointError, match=r"config.json' is corrupt or truncated \(not valid JSON"):
        lowrank_kit.load(ckpt)


def test_a_missing_manifest(ckpt):
    (ckpt / "lowrank_manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no lowrank_manifest.json; it was not written completely"):
        lowrank_kit.load(ckpt)


def test_a_corrupt_manifest(ckpt):
    (ckpt / "lowrank_manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"lowrank_manifest.json' is corrupt or truncated"):
        lowrank_kit.load(ckpt)


def test_an_uncompressed_directory_is_not_a_checkpoint(tmp_path):
    from lowrank_kit.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint("qwen2_vl", tmp_path / "plain")
    with pytest.raises(CheckpointError, match="is not a lowrank_kit checkpoint .* lowrank_kit.load_model"):
        lowrank_kit.load(path)


def test_nonexistent_path_and_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        lowrank_kit.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; pass the directory"):
        lowrank_kit.load(tmp_path / "file")


@pytest.mark.parametrize("load", both_loaders())
def test_weights_that_do_not_fit_the_structure(ckpt, load):
    def other_rank(config):
        config["lowrank_config"]["structure"]["0"]["q_proj"]["rank"] += 1

    rewrite_config(ckpt, other_rank)
    with pytest.raises(CheckpointError, match=r"has shape \[.*\], but its lowrank_config structure needs"):
        load(ckpt)


@pytest.mark.parametrize("load", both_loaders())
def test_a_structure_entry_without_weights(ckpt, load):
    def per_head_instead(config):
        config["lowrank_config"]["structure"]["1"]["q_proj"] = {"kind": "per_head", "ranks": [2, 2, 2, 2]}

    rewrite_config(ckpt, per_head_instead)
    with pytest.raises(
        CheckpointError, match=r"lacks the tensor '.*layers\.1\.self_attn\.q_proj\.up_weight'"
    ):
        load(ckpt)


def test_an_unknown_low_rank_kind(ckpt):
    def bad_kind(config):
        config["lowrank_config"]["structure"]["0"]["q_proj"]["kind"] = "sparse"

    rewrite_config(ckpt, bad_kind)
    with pytest.raises(
        CheckpointError, match="structure of this checkpoint is invalid: .*unknown low-rank kind 'sparse'"
    ):
        lowrank_kit.load(ckpt)


def test_unknown_quantization_config_fields(ckpt):
    rewrite_config(ckpt, lambda c: c["quantization_config"].update(group_size=64))
    with pytest.raises(CheckpointError, match=r"unknown fields \['group_size'\]"):
        AutoModelForImageTextToText.from_pretrained(ckpt)


def test_the_quantizer_refuses_to_compress_at_load_time(tmp_path):
    from lowrank_kit.hf_integration import LowRankConfig
    from lowrank_kit.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint("qwen2_vl", tmp_path / "plain")
    with pytest.raises(
        CheckpointError, match="loads checkpoints written by lowrank_kit; to compress a model"
    ):
        AutoModelForImageTextToText.from_pretrained(path, quantization_config=LowRankConfig())


def test_a_missing_lowrank_block(ckpt):
    rewrite_config(ckpt, lambda c: c.pop("lowrank_config"))
    with pytest.raises(
        CheckpointError,
        match="has model_type 'lowrank_kit' but its config.json has no 'lowrank_config' block",
    ):
        AutoModelForImageTextToText.from_pretrained(ckpt)


def test_load_refuses_weights_the_structure_does_not_use(ckpt):
    rewrite_config(ckpt, lambda c: c["lowrank_config"]["structure"].pop("1"))
    with pytest.raises(
        CheckpointError,
        match=r"does not match its model class: missing keys .*k_proj\.weight.*; unexpected keys .*k_proj\.down\.weight",
    ):
        lowrank_kit.load(ckpt)
