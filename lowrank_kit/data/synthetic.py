"""The testbed's synthetic visual questions: scenes of coloured shapes and four-option questions on them.

A scene is a 48×48 picture divided into a 4×4 grid of 12-pixel cells; each object (a colour, a shape
and a size) sits inside one cell, so one vision patch of the testbed model sees one object. Questions
come in six categories of different difficulty (what the question needs: find one object by one
property and read another; find it by two; count matching objects; compare two objects' positions):

============  ===========================================================  ======================
category      question                                                     options (fixed order)
============  ===========================================================  ======================
colour        What colour is the triangle? (the shape is unique)           red/green/blue/yellow
shape         What shape is the blue object? (the colour is unique)        the four shapes
size          What size is the red circle?                                 tiny/small/medium/large
position      Where is the red circle?                                     the four quarters
count         How many squares are there?                                  1/2/3/4
relation      Where is the red circle compared to the green cross?         left/right/above/below
============  ===========================================================  ======================

Every category has exactly four possible answers, and its options list all four in one fixed order
(as ordinal answers are usually listed): the answer letter is then a function of the answer alone,
so the model's work is the visual reasoning, not matching an answer to shuffled option texts.

Items are ScienceQA-style :class:`~lowrank_kit.data.items.VQAItem` objects (question, optional hint,
options A-D in shuffled order, answer letter, category, split); ``item.extra["scene"]`` keeps the
scene the image was drawn from and ``item.extra["refs"]`` the question's phrases that name one object
(``[phrase, index into scene]``; index None for the counted objects). Every item is a pure function of ``(split, seed, position)``: item
``i`` of a split is drawn from its own random stream, so the first ``n`` items of a split do not
depend on ``n``, and the categories take turns so any prefix is balanced. The splits are disjoint
by construction: a scene+question is assigned to one split by a hash of its content (80% train, 10%
validation, 10% test) and the generator of another split rejects it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from lowrank_kit.data.items import LETTERS, VQAItem
from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.errors import CalibrationError, unknown_name

# Changing anything below changes the items; bump this with it (it seeds every random stream).
GENERATOR_VERSION = 2

IMAGE_SIZE = 48
GRID = 4
CELL = IMAGE_SIZE // GRID
# CLIP's normalisation mean: an empty patch is all zeros after the image processor.
BACKGROUND = (122, 116, 104)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Side of the object's bounding box in pixels; every size fits inside a cell, and every (shape, size)
# draws a different patch (at 4 px a circle and a cross were the same pixels, which made some shape
# and count questions unanswerable); tests check it.
SIZES: dict[str, int] = {"tiny": 5, "small": 7, "medium": 9, "large": 11}
QUARTERS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("to the left", "to the right", "above", "below")
COUNT_OPTIONS = ("1", "2", "3", "4")
OPTIONS = 4

CATEGORIES = ("colour", "shape", "size", "position", "count", "relation")
SPLITS = ("train", "validation", "test")
# Standard split sizes (n=None); the test split is the `--data testbed` evaluation set.
SPLIT_SIZES = {"train": 20000, "validation": 480, "test": 480}
# Share of the hash space (out of 100) that belongs to each split.
_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
HINT_PROBABILITY = 0.4

QUESTIONS = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is drawn in {colour}?"),
    "position": ("Where is the {colour} {shape}?", "In which part of the picture is the {colour} {shape}?"),
    "count": ("How many {what} are there?", "How many {what} can you see?"),
    "size": ("What size is the {colour} {shape}?", "How big is the {colour} {shape}?"),
    "relation": (
        "Where is the {colour} {shape} compared to the {colour2} {shape2}?",
        "Where is the {colour} {shape} relative to the {colour2} {shape2}?",
    ),
}
HINTS = {
    "colour": ("Each object has one colour.", "Look at the colours of the objects."),
    "shape": ("The shapes are circles, squares, triangles and crosses.", "Look at the shapes."),
    "position": ("The picture is divided into four quarters.", "Look at where the objects are."),
    "count": ("Count the objects carefully.", "Some objects may look alike."),
    "size": ("Objects come in four sizes.", "Compare the sizes of the objects."),
    "relation": ("Compare the positions of the two objects.", "Left and right are as seen in the picture."),
}


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is, the grid cell it is in and its centre in pixels."""

    colour: str
    shape: str
    size: str
    row: int
    col: int
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


# -- rendering -------------------------------------------------------------------------------------------
def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    side = SIZES[obj.size]
    h = side / 2
    x0, y0, x1, y1 = obj.x - h, obj.y - h, obj.x + h, obj.y + h
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(obj.x, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "cross":
        bar = max(1.0, side / 6)
        draw.rectangle((x0, obj.y - bar, x1, obj.y + bar), fill=fill)
        draw.rectangle((obj.x - bar, y0, obj.x + bar, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; available: {', '.join(SHAPES)}")


def render(objects: list[SceneObject]) -> Image.Image:
    """The scene as a 48×48 RGB picture."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return image


# -- scenes ----------------------------------------------------------------------------------------------
def _place(colour: str, shape: str, size: str, cell: tuple[int, int]) -> SceneObject:
    row, col = cell
    # Centred in its cell: one vision patch sees exactly one object, always drawn the same way.
    return SceneObject(colour, shape, size, row, col, col * CELL + CELL // 2, row * CELL + CELL // 2)


class _Scene:
    """Objects being placed: free cells, and the (colour, shape) pairs taken (names stay unique)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cells = [(r, c) for r in range(GRID) for c in range(GRID)]
        rng.shuffle(self.cells)
        self.objects: list[SceneObject] = []

    def taken(self, colour: str, shape: str) -> bool:
        return any(o.colour == colour and o.shape == shape for o in self.objects)

    def add(self, colour: str, shape: str, size: str | None = None, cell=None) -> SceneObject:
        if cell is None:
            cell = self.cells.pop()
        else:
            self.cells.remove(cell)
        obj = _place(colour, shape, size or self.rng.choice(list(SIZES)), cell)
        self.objects.append(obj)
        return obj

    def add_other(self, allowed, size: str | None = None) -> SceneObject:
        """An object whose (colour, shape) satisfies ``allowed`` and is not in the scene yet."""
        pairs = [(c, s) for c in COLOURS for s in SHAPES if allowed(c, s) and not self.taken(c, s)]
        colour, shape = self.rng.choice(pairs)
        return self.add(colour, shape, size)


def _options(answer: str, pool) -> tuple[list[str], str]:
    """The category's four answers in their fixed order, and the letter of ``answer``."""
    options = list(pool)
    if len(options) != OPTIONS:
        raise ValueError(f"a testbed category needs exactly {OPTIONS} answers, got {options}")
    return options, LETTERS[options.index(answer)]


def _colour(rng: random.Random, scene: _Scene) -> tuple[str, list[str], str]:
    shape = rng.choice(SHAPES)
    target = scene.add(rng.choice(list(COLOURS)), shape)
    for _ in range(rng.randint(1, 4)):
        scene.add_other(lambda c, s: s != shape)
    question = rng.choice(QUESTIONS["colour"]).format(shape=shape)
    return (question, *_options(target.colour, COLOURS), [(shape, target)])


def _shape(rng: random.Random, scene: _Scene) -> tuple[str, list[str], str]:
    colour = rng.choice(list(COLOURS))
    target = scene.add(colour, rng.choice(SHAPES))
    for _ in range(rng.randint(1, 4)):
        scene.add_other(lambda c, s: c != colour)
    question = rng.choice(QUESTIONS["shape"]).format(colour=colour)
    return (question, *_options(target.shape, SHAPES), [(colour, target)])


def quarter(row: int, col: int) -> str:
    """The quarter of the picture grid cell ``(row, col)`` is in."""
    half = GRID // 2
    return QUARTERS[(row >= half) * 2 + (col >= half)]


def _position(rng: random.Random, scene: _Scene) -> tuple[str, list[str], str]:
    target = scene.add(rng.choice(list(COLOURS)), rng.choice(SHAPES))
    for _ in range(rng.randint(1, 4)):
        scene.add_other(lambda c, s: True)
    question = rng.choice(QUESTIONS["position"]).format(colour=target.colour, shape=target.shape)
    return (question, *_options(quarter(target.row, target.col), QUARTERS), [(target.name, target)])


def _count(rng: random.Random, scene: _Scene) -> tuple[str, list[str], str]:
    by_colour = rng.random() < 0.5
    key = rng.choice(list(COLOURS)) if by_colour else rng.choice(SHAPES)
    n = rng.randint(1, 4)
    for _ in range(n):
        if by_colour:
            scene.add_other(lambda c, s: c == key)
        else:
            scene.add_other(lambda c, s: s == key)
    for _ in range(rng.randint(0, 3)):
        scene.add_other(lambda c, s: (c != key) if by_colour else (s != key))
    what = f"{key} objects" if by_colour else plural(key)
    question = rng.choice(QUESTIONS["count"]).format(what=what)
    # The counted phrase refers to every matching object (index None: the target is the count).
    return (question, *_options(str(n), COUNT_OPTIONS), [(key if by_colour else plural(key), None)])


def _size(rng: random.Random, scene: _Scene) -> tuple[str, list[str], str]:
    target = scene.add(rng.choice(list(COLOURS)), rng.choice(SHAPES))
    for _ in range(rng.randint(1, 4)):
        scene.add_other(lambda c, s: True)
    question = rng.choice(QUESTIONS["size"]).format(colour=target.colour, shape=target.shape)
    return (question, *_options(target.size, SIZES), [(target.name, target)])


def _relation(rng: random.Random, scene: _Scene) -> tuple[str, list[str], str]:
    # Two objects in one row (or column) and in its two halves, so exactly one relation holds.
    a = scene.add_other(lambda c, s: True)
    same_row = rng.random() < 0.5
    half = GRID // 2
    line = [
        cell
        for cell in scene.cells
        if (cell[0] == a.row and (cell[1] < half) != (a.col < half))
        or (not same_row and cell[1] == a.col and (cell[0] < half) != (a.row < half))
    ]
    line = [cell for cell in line if (cell[0] == a.row) == same_row]
    b = scene.add(
        *rng.choice([(c, s) for c in COLOURS for s in SHAPES if not scene.taken(c, s)]), cell=rng.choice(line)
    )
    for _ in range(rng.randint(0, 3)):
        scene.add_other(lambda c, s: True)
    if same_row:
        answer = RELATIONS[0] if a.col < b.col else RELATIONS[1]
    else:
        answer = RELATIONS[2] if a.row < b.row else RELATIONS[3]
    question = rng.choice(QUESTIONS["relation"]).format(
        colour=a.colour, shape=a.shape, colour2=b.colour, shape2=b.shape
    )
    return (question, *_options(answer, RELATIONS), [(a.name, a), (b.name, b)])


_MAKERS = {
    "colour": _colour,
    "shape": _shape,
    "position": _position,
    "count": _count,
    "size": _size,
    "relation": _relation,
}


# -- items -----------------------------------------------------------------------------------------------
def _bucket(category: str, question: str, objects: list[SceneObject]) -> int:
    """Which hundredth of the hash space a scene+question falls in."""
    content = sorted((o.colour, o.shape, o.size, o.row, o.col) for o in objects)
    key = json.dumps([category, question, content]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CalibrationError(str(unknown_name("testbed split", split, SPLITS)))


def make_item(split: str, position: int, seed: int = 0) -> VQAItem:
    """Item ``position`` of ``split`` for ``seed``."""
    _check_split(split)
    category = CATEGORIES[position % len(CATEGORIES)]
    rng = random.Random(f"lowrank_kit.testbed/v{GENERATOR_VERSION}/{split}/{seed}/{position}")
    while True:
        scene = _Scene(rng)
        question, options, answer, refs = _MAKERS[category](rng, scene)
        if _bucket(category, question, scene.objects) in _BUCKETS[split]:
            break
    hint = rng.choice(HINTS[category]) if rng.random() < HINT_PROBABILITY else None
    return VQAItem(
        image=render(scene.objects),
        question=question,
        options=options,
        answer=answer,
        hint=hint,
        category=category,
        index=position,
        split=split,
        extra={
            "scene": [asdict(o) for o in scene.objects],
            # The phrases of the question that name one object, in order, and that object's index.
            "refs": [[phrase, None if obj is None else scene.objects.index(obj)] for phrase, obj in refs],
        },
    )


def generate_items(split: str, n: int | None = None, seed: int = 0) -> list[VQAItem]:
    """The first ``n`` items of ``split`` (``n=None``: the split's standard size, :data:`SPLIT_SIZES`).

    Deterministic in ``(split, seed)``; ``generate_items(split, k)`` is a prefix of
    ``generate_items(split, n)`` for ``k <= n``; the categories take turns, so every prefix is balanced.
    """
    _check_split(split)
    if n is None:
        n = SPLIT_SIZES[split]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CalibrationError(f"number of testbed items must be a positive integer, got {n!r}")
    return [make_item(split, i, seed) for i in range(n)]


def export_tsv(split: str, path: str | Path, n: int | None = None, seed: int = 0) -> Path:
    """Write ``generate_items(split, n, seed)`` as a VLMEvalKit TSV at ``path``."""

    path = Path(path)
    if not path.parent.is_dir():
        raise CalibrationError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    return write_tsv(generate_items(split, n, seed=seed), path)


def vocabulary() -> list[str]:
    """Every word and punctuation mark the generator can write, in a fixed order."""
    texts: list[str] = []
    for templates in QUESTIONS.values():
        texts.extend(templates)
    for hints in HINTS.values():
        texts.extend(hints)
    texts.extend(COLOURS)
    texts.extend(SHAPES)
    texts.extend(plural(s) for s in SHAPES)
    texts.extend(SIZES)
    texts.extend(QUARTERS)
    texts.extend(RELATIONS)
    texts.extend(COUNT_OPTIONS)
    texts.append("objects")
    return _words(texts)


def _words(texts) -> list[str]:
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", " ", text)):
            seen.setdefault(word, None)
    return list(seen)
