"""The per-item cache: reused when nothing changed, never when any part of its key did."""

import dataclasses

import pytest
import torch
from eval_helpers import make_items
from PIL import Image

import lowrank_kit
from lowrank_kit.eval.cache import EvalCache
from lowrank_kit.eval.engine import evaluate
from lowrank_kit.models.families.llava import llava
from lowrank_kit.models.tiny import build_tiny_model, build_tiny_processor


@pytest.fixture
def setup(tmp_path):
    return build_tiny_model("llava"), build_tiny_processor("llava"), EvalCache(tmp_path / "eval")


def run(model, processor, cache, items, **kw):
    kw.setdefault("max_new_tokens", 3)
    return evaluate(model, processor, llava, items, cache=cache, **kw)


def test_a_rerun_reuses_every_item_and_gives_the_same_results(setup):
    model, processor, cache = setup
    items = make_items(4)
    first = run(model, processor, cache, items)
    second = run(model, processor, cache, items, batch_size=3)
    assert first.cache_hits == 0 and second.cache_hits == 4
    assert all(r.cached for r in second.items)
    strip = lambda r: {**r.to_dict(), "cached": None}  # noqa: E731
    assert [strip(r) for r in first.items] == [strip(r) for r in second.items]


def _changed_model(model, processor, items):
    other = build_tiny_model("llava")
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1e-3
    return other, processor, items, {}


def _changed_image(model, processor, items):
    pixels = items[0].image.copy()
    pixels.putpixel((0, 0), (0, 0, 0) if pixels.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    return model, processor, [dataclasses.replace(items[0], image=pixels), *items[1:]], {}


def _changed_text(model, processor, items):
    return (
        model,
        processor,
        [dataclasses.replace(items[0], question=items[0].question + " Think."), *items[1:]],
        {},
    )


def _changed_options(model, processor, items):
    opts = list(items[0].options)
    opts[-1] = opts[-1] + "ish"
    return model, processor, [dataclasses.replace(items[0], options=opts), *items[1:]], {}


def _changed_style(model, processor, items):
    return model, processor, items, {"prompt_style": "dataset"}


def _changed_generation(model, processor, items):
    return model, processor, items, {"max_new_tokens": 4}


def _changed_template(model, processor, items):
    proc = build_tiny_processor("llava")
    proc.chat_template = "SYSTEM: be brief.\n" + proc.chat_template
    return model, proc, items, {}


@pytest.mark.parametrize(
    "change",
    [
        _changed_model,
        _changed_image,
        _changed_text,
        _changed_options,
        _changed_style,
        _changed_generation,
        _changed_template,
    ],
)
def test_any_change_to_the_key_is_a_miss(setup, change):
    model, processor, cache = setup
    items = make_items(3)
    run(model, processor, cache, items)
    model2, processor2, items2, kw = change(model, processor, items)
    again = run(model2, processor2, cache, items2, **kw)
    changed_all = change in (_changed_model, _changed_style, _changed_generation, _changed_template)
    expected_hits = 0 if changed_all else 2  # item changes touch item 0 only
    assert again.cache_hits == expected_hits
    assert again.items[0].cached is False


def test_a_new_lowrank_kit_version_is_a_miss(setup, monkeypatch):
    model, processor, cache = setup
    items = make_items(2)
    run(model, processor, cache, items)
    monkeypatch.setattr(lowrank_kit, "__version__", "99.0.0")
    assert run(model, processor, cache, items).cache_hits == 0


def test_a_damaged_entry_is_recomputed(setup, caplog):
    model, processor, cache = setup
    items = make_items(2)
    first = run(model, processor, cache, items)
    entries = sorted(cache.root.rglob("*.json"))
    assert len(entries) == 2
    entries[0].write_text("{ not json")
    again = run(model, processor, cache, items)
    assert again.cache_hits == 1
    assert "unreadable" in caplog.text
    assert {r.prediction for r in again.items} == {r.prediction for r in first.items}


def test_same_pixels_other_object_still_hits(setup):
    model, processor, cache = setup
    items = make_items(2)
    run(model, processor, cache, items)
    copies = [
        dataclasses.replace(it, image=Image.frombytes("RGB", it.image.size, it.image.tobytes()))
        for it in items
    ]
    assert run(model, processor, cache, copies).cache_hits == 2
