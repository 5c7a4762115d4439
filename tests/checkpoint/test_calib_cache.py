"""The calibration cache: keys follow content, entries are written whole, reruns reuse them exactly."""

import errno
import logging
import os

import pytest
import torch
from ckpt_helpers import samples_for

import lowrank_kit
from lowrank_kit import calib_cache
from lowrank_kit.calib_cache import CalibrationCache, cached, default_cache_dir, run_key
from lowrank_kit.errors import LowRankError
from lowrank_kit.models.tiny import build_tiny_model
from lowrank_kit.paths import CACHE_ENV


def test_get_or_compute_computes_once(tmp_path):
    cache = CalibrationCache(tmp_path, "run")
    calls = []

    def fn():
        calls.append(1)
        return {"x": torch.arange(6, dtype=torch.float32).view(2, 3), "n": torch.tensor(3)}

    first = cache.get_or_compute(("stage", "layer=0"), fn)
    again = cache.get_or_compute(("stage", "layer=0"), fn)
    other = cache.get_or_compute(("stage", "layer=1"), fn)
    assert len(calls) == 2
    assert torch.equal(first["x"], again["x"]) and int(again["n"]) == 3
    assert torch.equal(other["x"], first["x"])
    assert cache.hits == [cache.entry_path(("stage", "layer=0")).stem]
    assert len(cache.misses) == 2
    # Entries are renamed into place: no temporary file is left, and the key is described next to them.
    assert sorted(p.suffix for p in (tmp_path / "run").iterdir()) == [".json", ".safetensors", ".safetensors"]


def test_cached_without_a_cache_just_computes():
    assert torch.equal(cached(None, ("a",), lambda: {"t": torch.ones(2)})["t"], torch.ones(2))


def test_a_damaged_entry_is_computed_again(tmp_path, caplog):
    cache = CalibrationCache(tmp_path, "run")
    cache.get_or_compute(("s",), lambda: {"t": torch.ones(4)})
    path = cache.entry_path(("s",))
    path.write_bytes(path.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="lowrank_kit.calib_cache"):
        value = cache.get_or_compute(("s",), lambda: {"t": torch.full((4,), 2.0)})
    assert torch.equal(value["t"], torch.full((4,), 2.0))
    assert "is unreadable" in caplog.text and "computing it again" in caplog.text


def test_the_function_must_return_tensors(tmp_path):
    with pytest.raises(TypeError, match="must return a dict of tensors"):
        CalibrationCache(tmp_path, "run").get_or_compute(("s",), lambda: {"t": 1.0})


def test_a_full_disk_while_caching_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(calib_cache, "save_file", full)
    cache = CalibrationCache(tmp_path, "run")
    with pytest.raises(
        LowRankError, match=r"cannot write the calibration cache .*\(No space left .* --no-cache"
    ):
        cache.get_or_compute(("s",), lambda: {"t": torch.ones(1)})
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["key.json"]


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "calibration"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lowrank_kit" / "calibration"


def key_of(model, recipe, samples):
    return CalibrationCache.for_run("unused", model, recipe, samples, "cpu").key


def test_the_key_follows_model_recipe_and_data():
    model = build_tiny_model("llava")
    samples = samples_for(model)
    recipe = lowrank_kit.recipe_from_flags(model="llava", method="wsvd", ratio=0.5)
    key = key_of(model, recipe, samples)
    assert key == key_of(build_tiny_model("llava"), recipe, samples_for(model))
    # Where the model came from is not content: another alias or path gives the same key.
    assert key == key_of(model, recipe.model_copy(update={"model": "/elsewhere"}), samples)
    model.config._name_or_path = "/some/other/dir"
    assert key == key_of(model, recipe, samples)

    with torch.no_grad():
        changed = build_tiny_model("llava")
        changed.model.language_model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert key_of(changed, recipe, samples) != key
    assert key_of(build_tiny_model("llava", seed=1), recipe, samples) != key
    assert (
        key_of(model, lowrank_kit.recipe_from_flags(model="llava", method="wsvd", ratio=0.6), samples) != key
    )
    assert (
        key_of(model, lowrank_kit.recipe_from_flags(model="llava", method="svdllm", ratio=0.5), samples)
        != key
    )
    other = samples_for(model)
    other[1].inputs["input_ids"][0, 2] += 1
    assert key_of(model, recipe, other) != key
    assert key_of(model, recipe, samples[:1]) != key


def test_bf16_models_have_keys():
    model = build_tiny_model("qwen2_vl", dtype=torch.bfloat16)
    parts = run_key(model, lowrank_kit.recipe_from_flags(method="svdllm", ratio=0.5), [], "cpu")
    assert len(parts["model"]) == 64 and parts["device"] == "cpu"


@pytest.mark.parametrize(
    ("method", "allocation"), [("wsvd", None), ("qsvd", None), ("svdllm", None), ("asvd", "sensitivity")]
)
def test_a_rerun_reuses_everything_and_gives_the_same_factors(method, allocation, tmp_path):
    def run(cache_dir):
        model = build_tiny_model("qwen2_vl")
        recipe = lowrank_kit.recipe_from_flags(
            model="qwen2_vl", method=method, ratio=0.5, rank_allocation=allocation
        )
        return lowrank_kit.compress(model, recipe, calibration=samples_for(model), cache_dir=cache_dir)

    first, second, uncached = run(tmp_path), run(tmp_path), run(None)
    assert first.report["calibration_cache"]["reused"] == []
    assert first.report["calibration_cache"]["computed"]
    assert second.report["calibration_cache"]["computed"] == []
    assert second.report["calibration_cache"]["reused"] == first.report["calibration_cache"]["computed"]
    assert uncached.report["calibration_cache"] is None
    reference = uncached.model.state_dict()
    for result in (first, second):
        for name, value in result.model.state_dict().items():
            assert torch.equal(value, reference[name]), name
    stages = [s["stage"] for s in second.report["decompose"]["stages"]]
    assert "calibration: activations (reused from cache)" in stages


def test_wsvd_caches_every_stage(tmp_path):
    model = build_tiny_model("llava")
    recipe = lowrank_kit.recipe_from_flags(model="llava", method="wsvd", ratio=0.5, params={"finetune": True})
    result = lowrank_kit.compress(model, recipe, calibration=samples_for(model), cache_dir=tmp_path)
    computed = result.report["calibration_cache"]["computed"]
    assert [c.split("-")[0] for c in computed] == [
        "input_stats",
        "gradient_stats",
        "wsvd_finetune",
        "wsvd_finetune",
    ]
    assert "layer=0" in computed[2] and "layer=1" in computed[3]


def test_recipes_without_calibration_use_no_cache(tmp_path):
    model = build_tiny_model("llava")
    recipe = lowrank_kit.recipe_from_flags(model="llava", method="svd", ratio=0.5)
    result = lowrank_kit.compress(model, recipe, cache_dir=tmp_path)
    assert result.report["calibration_cache"] is None
    assert list(tmp_path.iterdir()) == []
