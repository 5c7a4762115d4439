"""Text corpora: spec parsing and its errors, disjoint calibration/evaluation parts, token windows,
calibration samples."""

import logging
from pydoc_data.topics import topics

import datasets
import pytest
import torch

from lowrank_kit.data import text as T
from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.data.text import (
    CorpusError,
    corpus_text,
    parse_corpus,
    text_calibration_samples,
    token_windows,
)
from lowrank_kit.errors import CalibrationError
from lowrank_kit.models.tiny import _tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """Character-level, built in code: one token per character, no special tokens added."""
    return _tiny_tokenizer()


def _paragraphs(text):
    return {p.strip() for p in text.split("\n\n") if p.strip()}


# -- specs ----------------------------------------------------------------------------------------------
def test_specs_parse_to_their_kind(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n", encoding="utf-8")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert parse_corpus("text:pydoc").kind == "pydoc"
    assert parse_corpus(f"text:{tmp_path / 'a.txt'}").kind == "file"
    assert parse_corpus(f"text:{tmp_path}").kind == "directory"
    hub = parse_corpus("hf:Salesforce/wikitext:wikitext-2-raw-v1")
    assert (hub.kind, hub.location, hub.config) == ("hub", "Salesforce/wikitext", "wikitext-2-raw-v1")
    assert parse_corpus("hf:some/dataset").config is None
    disk = parse_corpus(f"hf:{tmp_path / 'saved'}")
    assert (disk.kind, disk.location) == ("disk", str(tmp_path / "saved"))
    # A directory that save_to_disk did not write is a local copy of a hub repository: load_dataset reads it.
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "test.csv").write_text("text\nhello\n", encoding="utf-8")
    repo = parse_corpus(f"hf:{tmp_path / 'repo'}:default")
    assert (repo.kind, repo.location, repo.config) == ("hub", str(tmp_path / "repo"), "default")


@pytest.mark.parametrize(
    "spec", ["", "pydoc", "wikitext", "txt:pydoc", "text:", "hf:", "hf:name:", "hf:a:b:c", "hf::config"]
)
def test_invalid_spec_names_what_was_received_and_the_valid_forms(spec):
    with pytest.raises(
        CorpusError, match=rf"^invalid text corpus '{spec}'; expected text:pydoc, text:PATH .*hf:PATH"
    ):
        parse_corpus(spec)


def test_missing_text_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=r"^text corpus .*: file '.*nope\.txt' does not exist$"):
        corpus_text(f"text:{missing}", "evaluation")


def test_missing_dataset_directory_is_one_line(tmp_path):
    with pytest.raises(CorpusError, match=r"^text corpus .*: dataset directory '.*gone' does not exist$"):
        parse_corpus(f"hf:{tmp_path / 'gone'}")


def test_save_to_disk_directory_takes_no_config(tmp_path):
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(CorpusError, match="a save_to_disk directory has no configurations; use hf:PATH"):
        parse_corpus(f"hf:{tmp_path / 'saved'}:cfg")


def test_unknown_part_and_a_split_for_a_text_corpus_are_errors():
    with pytest.raises(CorpusError, match="unknown corpus part 'train'; available: calibration, evaluation"):
        corpus_text("text:pydoc", "train")
    with pytest.raises(
        CorpusError, match="'text:pydoc' has no dataset splits .*only hf: corpora take a split"
    ):
        corpus_text("text:pydoc", "evaluation", split="test")


# -- text:pydoc -----------------------------------------------------------------------------------------
def test_pydoc_parts_are_whole_topics_disjoint_and_deterministic():
    calibration = corpus_text("text:pydoc", "calibration")
    evaluation = corpus_text("text:pydoc", "evaluation")
    assert calibration == corpus_text("text:pydoc", "calibration")
    assert evaluation == corpus_text("text:pydoc", "evaluation")
    eval_topics = [k for k in sorted(topics) if T.is_evaluation_document(k)]
    assert 0 < len(eval_topics) < len(topics)
    assert evaluation == "\n\n".join(topics[k] for k in eval_topics)
    # Topics repeat each other's paragraphs; none of the evaluation ones may reach calibration.
    assert not _paragraphs(calibration) & _paragraphs(evaluation)
    words_eval, words_cal = len(evaluation.split()), len(calibration.split())
    assert 0.1 < words_eval / (words_eval + words_cal) < 0.3


def test_the_document_rule_sends_about_one_in_five_names_to_evaluation():
    names = [f"doc-{i}" for i in range(2000)]
    share = sum(T.is_evaluation_document(n) for n in names) / len(names)
    assert 0.17 < share < 0.23  # binomial(2000, 0.2): the standard deviation is 0.009


# -- text:PATH ------------------------------------------------------------------------------------------
def _names(evaluation: bool, n: int, folder: str = ""):
    names = [f"{folder}doc{i}.txt" for i in range(100)]
    return [name for name in names if T.is_evaluation_document(name) == evaluation][:n]


def test_directory_documents_split_by_name_and_shared_paragraphs_stay_out_of_calibration(tmp_path):
    (eval_name,), (cal_name,), (nested,) = _names(True, 1), _names(False, 1), _names(False, 1, "sub/")
    shared = "A paragraph that both documents quote."
    (tmp_path / eval_name).write_text(f"Evaluation text.\n\n{shared}", encoding="utf-8")
    (tmp_path / cal_name).write_text(f"Calibration one.\n\n{shared}\n\nMore calibration.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / nested).write_text("Nested text.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a .txt file", encoding="utf-8")
    spec = f"text:{tmp_path}"
    assert corpus_text(spec, "evaluation") == f"Evaluation text.\n\n{shared}"
    assert corpus_text(spec, "calibration") == "Calibration one.\n\nMore calibration.\n\nNested text."


def test_directory_without_text_files_is_an_error(tmp_path):
    (tmp_path / "a.md").write_text("x", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"directory '.*' has no \.txt files"):
        corpus_text(f"text:{tmp_path}", "calibration")


def test_text_file_is_cut_by_position_at_a_line_end(tmp_path):
    lines = [f"line {i} of the file" for i in range(100)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    calibration = corpus_text(f"text:{path}", "calibration")
    evaluation = corpus_text(f"text:{path}", "evaluation")
    assert calibration + evaluation == path.read_text(encoding="utf-8")
    assert calibration.endswith("\n")
    no_line_end = tmp_path / "flat.txt"
    no_line_end.write_text("0123456789", encoding="utf-8")
    assert corpus_text(f"text:{no_line_end}", "evaluation") == "89"
    assert 0.78 < len(calibration) / (len(calibration) + len(evaluation)) < 0.82


def test_a_file_too_short_to_split_and_a_non_utf8_file_are_errors(tmp_path):
    one_line = tmp_path / "one.txt"
    one_line.write_text("a single line that ends\n", encoding="utf-8")  # the cut moves to its end
    with pytest.raises(CorpusError, match=r"^the evaluation part of text corpus '.*one\.txt' is empty$"):
        corpus_text(f"text:{one_line}", "evaluation")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"text file '.*latin\.txt' is not UTF-8"):
        corpus_text(f"text:{latin}", "calibration")


# -- hf: ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_dict(tmp_path):
    path = tmp_path / "wiki"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["train one", "", "train two"], "id": [0, 1, 2]}),
            "test": datasets.Dataset.from_dict({"text": ["test one", "test two"], "id": [3, 4]}),
        }
    ).save_to_disk(str(path))
    return path


def test_save_to_disk_directory_uses_its_splits(saved_dict):
    spec = f"hf:{saved_dict}"
    assert corpus_text(spec, "calibration") == "train one\n\n\n\ntrain two"  # rows joined as-is, blanks too
    assert corpus_text(spec, "evaluation") == "test one\n\ntest two"
    assert corpus_text(spec, "evaluation", split="train") == corpus_text(spec, "calibration")


def test_missing_split_and_missing_column_list_what_exists(saved_dict):
    spec = f"hf:{saved_dict}"
    with pytest.raises(CorpusError, match="has no split 'validation' for evaluation; splits: train, test"):
        corpus_text(spec, "evaluation", split="validation")
    with pytest.raises(CorpusError, match="has no text column 'content'; columns: text, id"):
        corpus_text(spec, "evaluation", column="content")


def test_a_dataset_without_splits_is_cut_by_row_position(tmp_path):
    path = tmp_path / "rows"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(10)]}).save_to_disk(str(path))
    assert corpus_text(f"hf:{path}", "calibration") == "\n\n".join(f"row {i}" for i in range(8))
    assert corpus_text(f"hf:{path}", "evaluation") == "row 8\n\nrow 9"
    with pytest.raises(CorpusError, match="is one Dataset without splits \\(got split 'test'\\)"):
        corpus_text(f"hf:{path}", "evaluation", split="test")


def test_unreadable_save_to_disk_directory_is_one_line(tmp_path):
    path = tmp_path / "broken"
    path.mkdir()
    (path / "state.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(
        CorpusError, match=r"^cannot read dataset directory '.*broken' \(.*\); write it again"
    ) as err:
        corpus_text(f"hf:{path}", "calibration")
    assert "\n" not in str(err.value)


def test_hub_dataset_reads_the_part_split(monkeypatch):
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"{split} text"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = "hf:Salesforce/wikitext:wikitext-2-raw-v1"
    assert corpus_text(spec, "calibration") == "train text"
    assert corpus_text(spec, "evaluation") == "test text"
    assert corpus_text(spec, "evaluation", split="validation") == "validation text"
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),
    ]


def test_dataset_unavailable_offline_says_how_to_provide_it(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError) as err:
        corpus_text("hf:Salesforce/wikitext:wikitext-2-raw-v1", "evaluation")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "cannot load dataset 'Salesforce/wikitext' config 'wikitext-2-raw-v1' split 'test' (ConnectionError: "
    )
    for how in ("HF_DATASETS_OFFLINE=1", "save_to_disk directory as hf:PATH", "text file as text:PATH"):
        assert how in message


# -- token windows --------------------------------------------------------------------------------------
def test_token_windows_cut_the_stream_and_drop_the_tail(tokenizer):
    text = "abcdefghij" * 10 + "xyz"  # 103 characters, one token each
    stream = torch.tensor(tokenizer(text)["input_ids"])
    assert stream.numel() == 103
    windows = token_windows(tokenizer, text, 10)
    assert windows.shape == (10, 10) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), stream[:100])
    assert torch.equal(token_windows(tokenizer, text, 10, max_windows=3), windows[:3])
    overlapping = token_windows(tokenizer, text, 10, stride=5)
    assert overlapping.shape == (19, 10)
    assert torch.equal(overlapping[1], stream[5:15])


def test_token_windows_errors(tokenizer):
    with pytest.raises(CorpusError, match="the text is 5 tokens long, shorter than one window of 8"):
        token_windows(tokenizer, "short", 8)
    with pytest.raises(ValueError, match="window must be at least 2 tokens, got 1"):
        token_windows(tokenizer, "text", 1)
    with pytest.raises(ValueError, match="stride must be at least 1 token, got 0"):
        token_windows(tokenizer, "text", 2, stride=0)
    with pytest.raises(ValueError, match="max_windows must be at least 1 or None, got 0"):
        token_windows(tokenizer, "text", 2, max_windows=0)


# -- calibration samples --------------------------------------------------------------------------------
def test_calibration_samples_are_seeded_windows_of_the_calibration_part(tokenizer):
    samples = text_calibration_samples(tokenizer, "text:pydoc", 4, 64, seed=0)
    assert len(samples) == 4 and all(isinstance(s, CalibrationSample) for s in samples)
    windows = token_windows(tokenizer, corpus_text("text:pydoc", "calibration"), 64)
    for s in samples:
        ids = s.inputs["input_ids"]
        assert ids.shape == (1, 64) and s.num_tokens == 64
        assert torch.equal(s.labels, ids)
        assert torch.equal(s.inputs["attention_mask"], torch.ones_like(ids))
        assert (windows == ids).all(dim=1).any()
    again = text_calibration_samples(tokenizer, "text:pydoc", 4, 64, seed=0)
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(samples, again, strict=True))
    other = text_calibration_samples(tokenizer, "text:pydoc", 4, 64, seed=1)
    assert not all(torch.equal(a.labels, b.labels) for a, b in zip(samples, other, strict=True))


def test_fewer_windows_than_asked_gives_all_of_them_with_a_warning(tokenizer, tmp_path, caplog):
    path = tmp_path / "small.txt"
    path.write_text("0123456789" * 4 + "\n" + "tail\n", encoding="utf-8")  # calibration: 41 characters
    with caplog.at_level(logging.WARNING, logger="lowrank_kit.data.text"):
        samples = text_calibration_samples(tokenizer, f"text:{path}", 10, 8, seed=0)
    assert len(samples) == 5
    assert "has 5 calibration windows of 8 tokens, fewer than the 10 asked for" in caplog.text


def test_calibration_part_shorter_than_one_window_is_a_calibration_error(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abc\ndef\n", encoding="utf-8")
    with pytest.raises(
        CalibrationError, match=r"calibration part of text corpus .*: the text is \d+ tokens long"
    ):
        text_calibration_samples(tokenizer, f"text:{path}", 2, 64, seed=0)
    with pytest.raises(CalibrationError, match="num_samples must be at least 1, got 0"):
        text_calibration_samples(tokenizer, f"text:{path}", 0, 64, seed=0)
