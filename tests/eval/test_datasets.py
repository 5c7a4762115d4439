"""--data: TSV paths, VLMEvalKit names under $LMUData, save_to_disk datasets in both field layouts, errors."""

import datasets
import pytest
from eval_helpers import make_items
from PIL import Image

from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.eval.datasets import load_eval_data
from lowrank_kit.eval.engine import EvaluationError


def test_tsv_path_and_limit(tmp_path):
    write_tsv(make_items(5), tmp_path / "x.tsv")
    data = load_eval_data(str(tmp_path / "x.tsv"), limit=3)
    assert data.source == "tsv" and [it.index for it in data.items] == ["0", "1", "2"]
    assert data.items[1].options == ["red", "blue", "green"]


def test_vlmeval_name_is_read_from_lmudata(tmp_path, monkeypatch):
    write_tsv(make_items(2), tmp_path / "ScienceQA_TEST.tsv")
    monkeypatch.setenv("LMUData", str(tmp_path))
    data = load_eval_data("ScienceQA_TEST")
    assert data.source == "vlmeval" and len(data.items) == 2


def test_missing_vlmeval_dataset_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LMUData", str(tmp_path))
    with pytest.raises(EvaluationError, match=rf"SEEDBench_IMG is not at '{tmp_path}/SEEDBench_IMG.tsv'"):
        load_eval_data("SEEDBench_IMG")


def test_unknown_name_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("LMUData", str(tmp_path))
    with pytest.raises(
        EvaluationError, match=r"unknown dataset 'MMBenchh' .*choices: testbed, ScienceQA_TEST"
    ):
        load_eval_data("MMBenchh")
    with pytest.raises(EvaluationError, match=r"TSV file 'nope.tsv' does not exist"):
        load_eval_data("nope.tsv")
    with pytest.raises(EvaluationError, match=r"neither an existing file nor a directory"):
        load_eval_data("some/where")
    with pytest.raises(EvaluationError, match=r"--limit must be a positive integer, got 0"):
        load_eval_data("testbed", limit=0)


def _image(i):
    return Image.new("RGB", (8 + i, 8), (10 * i, 0, 0))


def test_scienceqa_rows_from_save_to_disk(tmp_path):
    """derek-thomas/ScienceQA fields: choices + answer index; text-only rows are left out (ScienceQA-IMG)."""
    rows = {
        "image": [_image(0), None, _image(2)],
        "question": ["Which is hot?", "Text only?", "Which is a bird?"],
        "choices": [["ice", "fire"], ["a", "b"], ["cat", "owl", "fish"]],
        "answer": [1, 0, 1],
        "hint": ["", "", "Look at the wings."],
        "subject": ["physics", "x", "biology"],
        "category": ["Heat", "x", "Animals"],
    }
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "sqa"))
    items = load_eval_data(str(tmp_path / "sqa")).items
    assert [(it.question, it.answer, it.category) for it in items] == [
        ("Which is hot?", "B", "Heat"),
        ("Which is a bird?", "B", "Animals"),
    ]
    assert items[0].hint is None and items[1].hint == "Look at the wings."
    with pytest.raises(EvaluationError, match=r"has no split 'validation'; splits: test"):
        load_eval_data(str(tmp_path / "sqa"), split="validation")


def test_seedbench_rows_from_save_to_disk(tmp_path):
    """lmms-lab/SEED-Bench fields: choice_a..d, answer letter, image list; video rows are left out."""
    rows = {
        "image": [[_image(0)], [_image(1), _image(2)], [_image(3)]],
        "question": ["What is shown?", "What happens next?", "How many?"],
        "choice_a": ["a park", "x", "one"],
        "choice_b": ["a room", "y", "two"],
        "choice_c": ["a lake", "z", "three"],
        "choice_d": ["a road", "w", "four"],
        "answer": ["B", "A", "D"],
        "data_type": ["image", "video", "image"],
        "question_type_id": [1, 11, 5],
        "question_id": ["q1", "q2", "q3"],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "seed"))
    items = load_eval_data(str(tmp_path / "seed")).items
    assert [(it.index, it.answer, it.category) for it in items] == [
        ("q1", "B", "Scene Understanding"),
        ("q3", "D", "Instances Counting"),
    ]
    assert items[1].options == ["one", "two", "three", "four"]


def test_rows_of_an_unknown_layout_are_an_error(tmp_path):
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(EvaluationError, match=r"has the fields label, text; expected ScienceQA-style rows"):
        load_eval_data(str(tmp_path / "other"))


def test_unreadable_dataset_directory(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(EvaluationError, match=r"cannot read dataset directory .*broken"):
        load_eval_data(str(tmp_path / "broken"))


def test_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvaluationError, match=r"cannot load dataset 'lmms-lab/SEED-Bench' split 'test'"):
        load_eval_data("seedbench")
