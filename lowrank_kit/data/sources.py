"""Calibration sources: the testbed generator, a VLMEvalKit TSV, or a ``datasets`` dataset.

Every source yields :class:`~lowrank_kit.data.items.VQAItem` objects; :func:`build_calibration` picks
``num_samples`` of them deterministically by seed and turns each into a
:class:`~lowrank_kit.data.calibration.CalibrationSample` with the model's own processor and chat template.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowrank_kit.errors import CalibrationError
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

# ScienceQA-style field names in `datasets` rows: (image, question, choices, answer index, hint, category).
HF_FIELDS = {
    "image": ("image",),
    "question": ("question",),
    "choices": ("choices", "options"),
    "answer": ("answer",),
    "hint": ("hint", "lecture_hint"),
    "category": ("category", "subject", "topic"),
}


def _field(row: dict[str, Any], key: str) -> Any:
    for name in HF_FIELDS[key]:
        if name in row:
            return row[name]
    return None


def items_from_rows(rows: Sequence[dict[str, Any]], origin: str) -> list:
    """ScienceQA-style rows → VQAItems. Rows without an image are not image questions and are left out."""
    from lowrank_kit.data.items import LETTERS, VQAItem

    if len(rows) == 0:
        raise CalibrationError(f"calibration data {origin} is empty")
    first = rows[0]
    missing = [
        k
        for k in ("image", "question", "choices", "answer")
        if _field(first, k) is None and not any(n in first for n in HF_FIELDS[k])
    ]
    if missing:
        raise CalibrationError(
            f"calibration data {origin} lacks the fields {', '.join(missing)}; expected ScienceQA-style rows "
            f"with {', '.join('/'.join(v) for v in HF_FIELDS.values())}"
        )
    items, without_image = [], 0
    for i, row in enumerate(rows):
        image = _field(row, "image")
        if image is None:
            without_image += 1
            continue
        answer = _field(row, "answer")
        letter = LETTERS[int(answer)] if not isinstance(answer, str) else answer.strip().upper()
        items.append(
            VQAItem(
                image=image.convert("RGB"),
                question=str(_field(row, "question")),
                options=[str(c) for c in _field(row, "choices")],
                answer=letter,
                hint=_field(row, "hint") or None,
                category=str(_field(row, "category") or ""),
                index=i,
            )
        )
    if not items:
        raise CalibrationError(
            f"calibration data {origin} has no items with an image ({without_image} rows without)"
        )
    if without_image:
        log.info(
            "calibration data %s: using %d image items, leaving out %d text-only rows",
            origin,
            len(items),
            without_image,
        )
    return items


def load_items(spec) -> list:
    """All candidate items of a :class:`~lowrank_kit.recipe.CalibrationSpec`."""
    if spec.source == "testbed":
        from lowrank_kit.testbed.generator import generate_items

        return generate_items(spec.split, spec.num_samples, seed=spec.seed)
    if spec.source == "tsv":
        from lowrank_kit.data.tsv import load_tsv

        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise CalibrationError(f"calibration TSV {str(path)!r} does not exist")
        items = load_tsv(path)
        if spec.split:
            with_split = [it for it in items if it.split]
            if with_split:
                items = [it for it in items if it.split == spec.split]
                if not items:
                    splits = sorted({it.split for it in with_split})
                    raise CalibrationError(
                        f"calibration TSV {str(path)!r} has no rows in split {spec.split!r}; splits: {', '.join(splits)}"
                    )
        if not items:
            raise CalibrationError(f"calibration TSV {str(path)!r} has no rows")
        return items
    import datasets

    if spec.path:
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise CalibrationError(f"calibration dataset directory {str(path)!r} does not exist")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises anything from FileNotFoundError to IndexError here
            raise CalibrationError(
                f"cannot read calibration dataset directory {str(path)!r} with datasets {datasets.__version__} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}); "
                "write it again with Dataset.save_to_disk (an empty split needs num_shards=1)"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise CalibrationError(
                    f"calibration dataset {str(path)!r} has no split {spec.split!r}; splits: {', '.join(ds)}"
                )
            ds = ds[spec.split]
        origin = repr(str(path))
    else:
        try:
            ds = datasets.load_dataset(spec.dataset, split=spec.split)
        except Exception as err:
            raise CalibrationError(
                f"cannot load dataset {spec.dataset!r} split {spec.split!r}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        origin = repr(spec.dataset)
    return items_from_rows(ds, origin)


def select(items: list, n: int, seed: int) -> list:
    """``n`` items chosen by ``seed`` (all of them, in a seeded order, when fewer exist)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n]]


def build_calibration(spec, processor: Any, adapter, *, reporter: Reporter = NULL_REPORTER) -> list:
    """Calibration samples for ``spec`` through ``processor`` and ``adapter``."""
    from lowrank_kit.data.samples import make_sample

    items = load_items(spec)
    chosen = items if spec.source == "testbed" else select(items, spec.num_samples, spec.seed)
    samples = []
    with reporter.stage("calibration data", total=len(chosen)) as stage:
        for item in chosen:
            samples.append(
                make_sample(processor, adapter, item, spec.max_length, prompt_style=spec.prompt_style)
            )
            stage.advance()
    return samples
