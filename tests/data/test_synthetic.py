"""The testbed's question generator: determinism, splits, answers that follow from the scene, export."""

import csv
import re

import numpy as np
import pytest

from lowrank_kit.data import synthetic as G
from lowrank_kit.data.items import LETTERS, build_mcq_prompt
from lowrank_kit.data.tsv import load_tsv
from lowrank_kit.errors import CalibrationError


@pytest.fixture(scope="module")
def test_items():
    return G.generate_items("test", 120)


def _objects(item):
    return [G.SceneObject(**o) for o in item.extra["scene"]]


def test_items_are_a_pure_function_of_split_seed_and_position(test_items):
    again = G.generate_items("test", 120)
    for a, b in zip(test_items, again, strict=True):
        assert (a.question, a.options, a.answer, a.hint, a.extra) == (
            b.question,
            b.options,
            b.answer,
            b.hint,
            b.extra,
        )
        assert a.image.tobytes() == b.image.tobytes()
    other_seed = G.generate_items("test", 30, seed=1)
    assert [i.extra["scene"] for i in other_seed] != [i.extra["scene"] for i in test_items[:30]]


def test_a_shorter_request_is_a_prefix_and_categories_take_turns(test_items):
    short = G.generate_items("test", 13)
    assert [i.extra for i in short] == [i.extra for i in test_items[:13]]
    first = [i.category for i in test_items[: len(G.CATEGORIES)]]
    assert first == list(G.CATEGORIES)
    counts = {c: sum(i.category == c for i in test_items) for c in G.CATEGORIES}
    assert set(counts.values()) == {120 // len(G.CATEGORIES)}


def test_splits_are_disjoint():
    def key(item):
        return (item.category, item.question, sorted(map(tuple, (o.values() for o in item.extra["scene"]))))

    train = {repr(key(i)) for i in G.generate_items("train", 600)}
    for split in ("validation", "test"):
        held_out = {repr(key(i)) for i in G.generate_items(split, 240)}
        assert not train & held_out, split
    assert G.generate_items("validation", 20)[0].extra != G.generate_items("test", 20)[0].extra


def _expected_answer(item):
    objs = _objects(item)
    q = item.question
    if item.category == "count":
        what = re.match(r"How many (.+?) (?:are there|can you see)\?", q).group(1)
        if what.endswith(" objects"):
            return str(sum(o.colour == what.removesuffix(" objects") for o in objs))
        return str(sum(G.plural(o.shape) == what for o in objs))
    named = [o for o in objs if re.search(rf"\b{o.colour} {o.shape}\b", q)]
    if item.category == "colour":
        (obj,) = [o for o in objs if re.search(rf"\b{o.shape}\b", q)]
        return obj.colour
    if item.category == "shape":
        (obj,) = [o for o in objs if re.search(rf"\b{o.colour}\b", q)]
        return obj.shape
    if item.category == "size":
        (obj,) = named
        return obj.size
    if item.category == "position":
        (obj,) = named
        return G.quarter(obj.row, obj.col)
    assert item.category == "relation"
    a, b = sorted(named, key=lambda o: q.index(f"{o.colour} {o.shape}"))
    if a.row == b.row:
        return "to the left" if a.col < b.col else "to the right"
    assert a.col == b.col
    return "above" if a.row < b.row else "below"


def test_every_answer_follows_from_the_scene(test_items):
    for item in test_items:
        assert item.answer_text == _expected_answer(item), (item.index, item.question, item.extra["scene"])
        assert item.options == list(
            {
                "colour": G.COLOURS,
                "shape": G.SHAPES,
                "size": G.SIZES,
                "position": G.QUARTERS,
                "count": G.COUNT_OPTIONS,
                "relation": G.RELATIONS,
            }[item.category]
        )
        assert item.answer in LETTERS[: G.OPTIONS]


def test_answers_are_spread_over_the_letters():
    items = G.generate_items("train", 1200)
    for category in G.CATEGORIES:
        letters = [i.answer for i in items if i.category == category]
        shares = [letters.count(x) / len(letters) for x in LETTERS[: G.OPTIONS]]
        # No letter (answer) is a shortcut: each is between 10% and 45% of its category.
        assert min(shares) > 0.1 and max(shares) < 0.45, (category, shares)


def test_the_image_shows_the_scene(test_items):
    for item in test_items[:24]:
        pixels = np.asarray(item.image)
        assert pixels.shape == (G.IMAGE_SIZE, G.IMAGE_SIZE, 3)
        for obj in _objects(item):
            assert tuple(pixels[obj.y, obj.x]) == G.COLOURS[obj.colour]
        occupied = {(o.row, o.col) for o in _objects(item)}
        for r in range(G.GRID):
            for c in range(G.GRID):
                cell = pixels[r * G.CELL : (r + 1) * G.CELL, c * G.CELL : (c + 1) * G.CELL]
                empty = bool((cell == G.BACKGROUND).all())
                assert empty == ((r, c) not in occupied)


def test_every_shape_and_size_draws_a_different_patch():
    # One vision patch sees one object, centred and drawn the same way every time: two (shape, size)
    # pairs with the same pixels would make shape and count questions about them unanswerable.
    patches = {}
    for shape in G.SHAPES:
        for size in G.SIZES:
            image = G.render([G.SceneObject("red", shape, size, 0, 0, G.CELL // 2, G.CELL // 2)])
            patch = np.asarray(image)[: G.CELL, : G.CELL].tobytes()
            assert patch not in patches, f"{shape} {size} draws the same pixels as {patches.get(patch)}"
            patches[patch] = (shape, size)
    assert len(patches) == len(G.SHAPES) * len(G.SIZES)


def test_object_names_are_unique_and_refs_point_at_the_named_objects(test_items):
    for item in test_items:
        names = [o.name for o in _objects(item)]
        assert len(names) == len(set(names))
        for phrase, index in item.extra["refs"]:
            assert phrase in item.question
            if index is not None:
                assert phrase.split()[-1] in _objects(item)[index].name


def test_every_prompt_word_is_in_the_testbed_vocabulary(test_items):
    from lowrank_kit.testbed.processor import build_tokenizer

    tokenizer = build_tokenizer()
    for item in test_items[:60]:
        for style in ("letter", "dataset"):
            ids = tokenizer(build_mcq_prompt(item, style))["input_ids"]
            assert tokenizer.unk_token_id not in ids, (style, build_mcq_prompt(item, style))
        # Every answer is one token.
        assert len(tokenizer.encode(item.answer_text, add_special_tokens=False)) == 1


def test_bad_split_and_count_are_refused():
    with pytest.raises(
        CalibrationError, match="unknown testbed split .dev.; available: test, train, validation"
    ):
        G.generate_items("dev", 3)
    for n in (0, -1, 2.5, True):
        with pytest.raises(CalibrationError, match="positive integer"):
            G.generate_items("test", n)


def test_export_writes_the_vlmevalkit_columns_and_reads_back(tmp_path, test_items):
    path = G.export_tsv("test", tmp_path / "test.tsv", n=12)
    with path.open(newline="") as f:
        header = next(csv.reader(f, delimiter="\t"))
    assert header == ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "split"]
    back = load_tsv(path)
    assert len(back) == 12
    for a, b in zip(back, test_items[:12], strict=True):
        assert (a.question, a.options, a.answer, a.category, a.split) == (
            b.question,
            b.options,
            b.answer,
            b.category,
            "test",
        )
        assert (a.hint or None) == b.hint
        assert a.image.convert("RGB").tobytes() == b.image.tobytes()
    with pytest.raises(CalibrationError, match="does not exist"):
        G.export_tsv("test", tmp_path / "missing" / "x.tsv", n=2)
