"""Calibration sources: `datasets` rows with ScienceQA-style fields, selection by seed, error cases."""

import datasets
import pytest
from PIL import Image

from lowrank_kit.data.sources import items_from_rows, load_items, select
from lowrank_kit.errors import CalibrationError
from lowrank_kit.recipe import CalibrationSpec


def _rows(n, with_image=True):
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    return [
        {
            "image": img if with_image or i % 2 else None,
            "question": f"What colour is shape {i}?",
            "choices": ["red", "green", "blue"],
            "answer": i % 3,
            "hint": "" if i % 2 else "Look closely.",
            "subject": "colour",
        }
        for i in range(n)
    ]


def test_scienceqa_style_rows_become_items():
    items = items_from_rows(_rows(4), "test")
    assert [it.answer for it in items] == ["A", "B", "C", "A"]
    assert items[0].hint == "Look closely." and items[1].hint is None
    assert items[0].category == "colour" and items[0].options == ["red", "green", "blue"]


def test_text_only_rows_are_left_out_and_all_text_only_is_an_error():
    assert len(items_from_rows(_rows(6, with_image=False), "test")) == 3
    rows = [dict(r, image=None) for r in _rows(3)]
    with pytest.raises(CalibrationError, match="has no items with an image"):
        items_from_rows(rows, "'x'")


def test_missing_fields_and_empty_data_are_errors():
    with pytest.raises(CalibrationError, match="is empty"):
        items_from_rows([], "'x'")
    with pytest.raises(CalibrationError, match="lacks the fields choices"):
        items_from_rows([{"image": None, "question": "q", "answer": 0}], "'x'")


def test_save_to_disk_dataset_loads_through_the_recipe_spec(tmp_path):
    ds = datasets.Dataset.from_list(_rows(5))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "sqa"))
    items = load_items(CalibrationSpec(source="hf", path=str(tmp_path / "sqa"), split="train"))
    assert len(items) == 5 and items[2].answer == "C"
    with pytest.raises(CalibrationError, match="has no split 'validation'; splits: train"):
        load_items(CalibrationSpec(source="hf", path=str(tmp_path / "sqa"), split="validation"))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_items(CalibrationSpec(source="hf", path=str(tmp_path / "nope")))


def test_selection_is_deterministic_by_seed():
    items = list(range(50))
    assert select(items, 10, seed=0) == select(items, 10, seed=0)
    assert select(items, 10, seed=0) != select(items, 10, seed=1)
    assert sorted(select(items, 100, seed=3)) == items
