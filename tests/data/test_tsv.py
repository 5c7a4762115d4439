"""VLMEvalKit TSV files: round trip, image references, and malformed files."""

import pytest
from PIL import Image

from lowrank_kit.data.items import VQAItem
from lowrank_kit.data.tsv import load_tsv, write_tsv
from lowrank_kit.errors import CalibrationError


def items():
    red, blue = Image.new("RGB", (6, 4), (250, 0, 0)), Image.new("RGB", (5, 5), (0, 0, 250))
    return [
        VQAItem(
            red,
            "Colour?",
            ["red", "blue", "green", "pink"],
            "A",
            hint="a\thint",
            category="color",
            index=0,
            split="test",
        ),
        VQAItem(blue, "Tab\there, new\nline?", ["yes", "no"], "B", category="misc", index=1, split="train"),
    ]


def test_round_trip(tmp_path):
    path = write_tsv(items(), tmp_path / "x.tsv")
    back = load_tsv(path)
    for a, b in zip(items(), back):
        assert (b.question, b.options, b.answer, b.hint, b.category, b.split) == (
            a.question,
            a.options,
            a.answer,
            a.hint,
            a.category,
            a.split,
        )
        assert str(b.index) == str(a.index)
        assert list(b.image.getdata()) == list(a.image.getdata())
    assert [p.name for p in tmp_path.iterdir()] == ["x.tsv"]  # no temporary file left behind


def test_an_image_field_may_refer_to_another_rows_index(tmp_path):
    plain = [VQAItem(it.image, "Colour?", it.options, it.answer, index=it.index) for it in items()]
    path = write_tsv(plain, tmp_path / "x.tsv")
    lines = path.read_text().splitlines()
    cells = lines[2].split("\t")
    cells[1] = "0"
    path.write_text("\n".join([lines[0], lines[1], "\t".join(cells)]) + "\n")
    back = load_tsv(path)
    assert list(back[1].image.getdata()) == list(back[0].image.getdata())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda rows: [rows[0].replace("answer", "solution"), *rows[1:]], "lacks the columns answer"),
        (
            lambda rows: [rows[0], rows[1].replace("\tA\tcolor", "\tE\tcolor")],
            r"line 2 \(index 0\): item '0': answer 'E' is not one of A, B, C, D",
        ),
        (
            lambda rows: [rows[0], "\t".join(["0", "!!notbase64" * 8, *rows[1].split("\t")[2:]])],
            "not a base64",
        ),
        (lambda rows: [rows[0], "\t".join(["0", "7", *rows[1].split("\t")[2:]])], "refers to index '7'"),
    ],
)
def test_malformed_files(tmp_path, edit, match):
    path = write_tsv(items()[:1], tmp_path / "x.tsv")
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(CalibrationError, match=match):
        load_tsv(path)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_tsv(tmp_path / "nope.tsv")
