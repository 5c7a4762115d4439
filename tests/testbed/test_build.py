"""Building the tiny testbed: deterministic weights, the cache (info, damage, rebuild), the CLI, loading.

Every test here uses a private cache directory and the tiny size. The tiny size itself is built once
(about 40 s on 2 cores); the tests that build again (determinism, rebuilding a damaged entry) use a
shortened tiny training in a cache of their own, through exactly the same build code.
"""

import dataclasses
import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from lowrank_kit.cli.main import app
from lowrank_kit.errors import ModelLoadError, UnknownNameError
from lowrank_kit.testbed import build as B

runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWRANK_KIT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(cache):
    res = runner.invoke(app, ["testbed", "build", "--size", "tiny", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_build_lands_in_the_versioned_cache_and_reports_what_it_measured(tiny, cache):
    path = cache / "testbed" / f"v{B.TESTBED_VERSION}" / "tiny"
    assert tiny["path"] == str(path) == str(B.testbed_dir("tiny"))
    for key in ("path", "test_accuracy", "train_seconds", "parameters", "weights_sha256"):
        assert key in tiny
    assert tiny["weights_sha256"] == B.sha256_file(path / "model.safetensors")
    assert set(tiny["test_accuracy_per_category"]) == {
        "colour",
        "shape",
        "size",
        "position",
        "count",
        "relation",
    }
    assert tiny["test_items"] == 480
    # Only the build's files: no temporary directory or lock left behind but the lock file itself.
    leftovers = [p.name for p in path.parent.iterdir() if p.name not in ("tiny", ".tiny.lock")]
    assert leftovers == []


def test_info_json_prints_the_same_record(tiny):
    res = runner.invoke(app, ["testbed", "info", "--size", "tiny", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == tiny
    table = runner.invoke(app, ["testbed", "info", "--size", "tiny"])
    assert table.exit_code == 0 and "test accuracy" in table.stdout


def test_the_tiny_model_learned_something(tiny):
    # Chance is 0.25 with a standard error of 0.02 on the 480 test items (0.048 on one category's 80):
    # 0.29 overall and 0.35 in its best category are two of them above chance. The tiny size is for
    # fast tests, not accuracy (it measured 0.31, colour 0.46, on the 2-core CPU; docs/testbed.md).
    per_category = tiny["test_accuracy_per_category"]
    assert tiny["test_accuracy"] >= 0.29, per_category
    assert max(per_category.values()) >= 0.35, per_category
    assert tiny["training"]["final_loss"] < 10.0


@pytest.fixture
def quick(tmp_path, monkeypatch):
    """A private cache in which the tiny size trains for 20 steps on 200 items (same build code)."""
    from lowrank_kit.testbed import model as M

    spec = M.SIZES["tiny"]
    short = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=20, train_items=200))
    monkeypatch.setitem(M.SIZES, "tiny", short)
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_building_twice_gives_the_same_weights(quick):
    (quick / "a").mkdir()
    (quick / "b").mkdir()
    first = B.build_testbed("tiny", quick / "a")
    again = B.build_testbed("tiny", quick / "b")
    assert first["training"]["steps"] == 20
    assert again["weights_sha256"] == first["weights_sha256"]
    assert again["test_accuracy"] == first["test_accuracy"]
    assert (quick / "a" / "model.safetensors").read_bytes() == (
        quick / "b" / "model.safetensors"
    ).read_bytes()


def test_building_twice_with_a_flat_spectrum_gives_the_same_weights(quick, monkeypatch):
    """The small size trains its Q/K/V under FlatSpectrum (QR every step): still deterministic."""
    from safetensors.torch import load_file

    from lowrank_kit.testbed import model as M

    spec = M.SIZES["tiny"]
    monkeypatch.setitem(
        M.SIZES, "tiny", dataclasses.replace(spec, train=dataclasses.replace(spec.train, flat_qkv=True))
    )
    (quick / "a").mkdir()
    (quick / "b").mkdir()
    first = B.build_testbed("tiny", quick / "a")
    again = B.build_testbed("tiny", quick / "b")
    assert again["weights_sha256"] == first["weights_sha256"]
    # The saved model is plain (no parametrization left) and every head's spectrum is flat.
    weights = load_file(quick / "a" / "model.safetensors")
    assert not any("parametrizations" in k for k in weights)
    q = next(v for k, v in weights.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    s = torch.linalg.svdvals(q[:32])
    assert float(s.max() / s.min()) < 1.0 + 1e-4


def test_a_second_ensure_uses_the_cache(tiny, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a good cache entry")

    monkeypatch.setattr(B, "build_testbed", fail)
    assert str(B.ensure_testbed("tiny")) == tiny["path"]


def test_loads_with_from_pretrained_and_through_the_llava_adapter(tiny):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lowrank_kit.data.samples import prompt_inputs
    from lowrank_kit.data.synthetic import generate_items
    from lowrank_kit.loading import load_model
    from lowrank_kit.models.tiny import build_tiny_model
    from lowrank_kit.registry import adapter_for_config

    model = LlavaForConditionalGeneration.from_pretrained(tiny["path"]).eval()
    assert sum(p.numel() for p in model.parameters()) == tiny["parameters"]
    processor = AutoProcessor.from_pretrained(tiny["path"])
    # The adapter a LLaVA-1.5 checkpoint gets.
    adapter = adapter_for_config(model.config)
    assert adapter.name == "llava"
    assert adapter_for_config(build_tiny_model("llava").config) is adapter

    loaded = load_model("testbed-tiny")
    assert loaded.adapter is adapter and loaded.path is not None
    assert str(loaded.path) == tiny["path"]
    item = generate_items("test", 1)[0]
    inputs = prompt_inputs(processor, adapter, item)
    with torch.no_grad():
        a = model(**inputs).logits
        b = loaded.model(**prompt_inputs(loaded.processor, loaded.adapter, item)).logits
    torch.testing.assert_close(a, b)
    assert len(adapter.decoder_layers(loaded.model)) == loaded.model.config.text_config.num_hidden_layers
    assert adapter.info(loaded.model).head_dim == 32


def test_compress_runs_on_the_testbed(tiny, tmp_path):
    out = tmp_path / "ckpt"
    res = runner.invoke(
        app,
        ["compress", "--model", "testbed-tiny", "--method", "svd", "--ratio", "0.6", "--output", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()


def test_a_damaged_build_is_rebuilt_with_a_warning(quick, caplog):
    path = B.ensure_testbed("tiny")
    good = B.testbed_info("tiny")["weights_sha256"]
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(ModelLoadError, match="damaged .*does not match the sha256.*--force"):
        B.testbed_info("tiny")
    with caplog.at_level(logging.WARNING, logger="lowrank_kit.testbed.build"):
        assert B.ensure_testbed("tiny") == path
    assert "damaged" in caplog.text and "rebuilding" in caplog.text
    assert B.testbed_info("tiny")["weights_sha256"] == good == B.sha256_file(weights)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "testbed.json").unlink(), "missing testbed.json"),
        (lambda p: (p / "testbed.json").write_text("{not json"), "testbed.json is unreadable"),
        (lambda p: (p / "testbed.json").write_text("[1]"), "not a JSON object"),
        (
            lambda p: (p / "testbed.json").write_text(json.dumps({"version": 0, "size": "tiny"})),
            "describes version 0",
        ),
    ],
)
def test_every_kind_of_damage_is_named(tiny, tmp_path, damage, reason):
    import shutil
    from pathlib import Path

    src = Path(tiny["path"])
    copy = tmp_path / "tiny"
    shutil.copytree(src, copy)
    assert B.damage(copy, "tiny") is None
    damage(copy)
    assert reason in B.damage(copy, "tiny")


def test_not_built_and_unknown_size_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not built yet.*lowrank testbed build --size tiny"):
        B.testbed_info("tiny")
    res = runner.invoke(app, ["testbed", "info", "--size", "tiny"])
    assert res.exit_code != 0 and "not built yet" in res.output
    with pytest.raises(UnknownNameError, match="unknown testbed size 'huge'; available: base, small, tiny"):
        B.testbed_dir("huge")
    res = runner.invoke(app, ["testbed", "build", "--size", "huge"])
    assert res.exit_code != 0 and "unknown testbed size 'huge'" in res.output
    assert not (tmp_path / "testbed").exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path))

    def boom(size, directory, **kwargs):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("injected training failure")

    monkeypatch.setattr(B, "build_testbed", boom)
    with pytest.raises(RuntimeError, match="injected"):
        B.ensure_testbed("tiny")
    root = tmp_path / "testbed" / f"v{B.TESTBED_VERSION}"
    assert [p.name for p in root.iterdir()] == [".tiny.lock"]
