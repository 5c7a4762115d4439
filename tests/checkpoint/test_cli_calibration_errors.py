"""Calibration data that cannot be used: one `Error:` line from the CLI, no traceback."""

import datasets
import pytest
from ckpt_helpers import fails
from PIL import Image

from lowrank_kit.models.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("models") / "llava")  # ships a processor


def calibration_rows(n, with_image):
    img = Image.new("RGB", (16, 16), (10, 200, 10))
    return [
        {"image": img if with_image else None, "question": f"q{i}?", "choices": ["a", "b"], "answer": i % 2}
        for i in range(n)
    ]


def calib(model, tmp_path, data):
    return (
        "compress",
        "--model",
        model,
        "--method",
        "svdllm",
        "--ratio",
        "0.5",
        "--calib-source",
        "hf",
        "--calib-path",
        data,
        "-o",
        tmp_path / "o",
        "--no-cache",
    )


def test_calibration_data_without_images(llava, tmp_path):
    data = tmp_path / "text-only"
    datasets.Dataset.from_list(calibration_rows(3, with_image=False)).save_to_disk(str(data))
    line = fails(*calib(llava, tmp_path, data))
    assert "has no items with an image (3 rows without)" in line


def test_calibration_data_with_an_empty_split(llava, tmp_path):
    data = tmp_path / "empty-split"
    full = datasets.Dataset.from_list(calibration_rows(2, with_image=True))
    splits = datasets.DatasetDict({"train": full.select([]), "test": full})
    splits.save_to_disk(str(data), num_shards={"train": 1, "test": 1})
    line = fails(*calib(llava, tmp_path, data))
    assert "is empty" in line


def test_calibration_directory_that_datasets_cannot_read(llava, tmp_path):
    data = tmp_path / "zero-shards"
    full = datasets.Dataset.from_list(calibration_rows(2, with_image=True))
    # datasets saves an empty split with zero shards and then cannot load it again.
    datasets.DatasetDict({"train": full.select([]), "test": full}).save_to_disk(str(data))
    line = fails(*calib(llava, tmp_path, data))
    assert "cannot read calibration dataset directory" in line and "IndexError" in line
