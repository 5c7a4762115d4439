"""What ``--data`` names: the testbed, a VLMEvalKit dataset under ``$LMUData``, a TSV, or a ``datasets`` dataset.

- ``testbed``: the testbed's standard test split (``lowrank_kit.data.synthetic.generate_items("test")``).
- ``ScienceQA_TEST``, ``ScienceQA_VAL``, ``SEEDBench_IMG``: VLMEvalKit's own TSV files, read from
  ``$LMUData/<name>.tsv`` (VLMEvalKit's data folder, ``~/LMUData`` when the variable is unset; VLMEvalKit
  downloads them there on first use). Any other ``<name>`` whose TSV is in that folder works too.
- a path to a TSV in VLMEvalKit's multiple-choice format (:func:`lowrank_kit.data.tsv.load_tsv`).
- ``scienceqa`` / ``seedbench``: the Hugging Face datasets ``derek-thomas/ScienceQA`` (image questions only)
  and ``lmms-lab/SEED-Bench`` (image questions only), split ``test`` unless ``split`` says otherwise;
  ``hf:<dataset id>`` loads another dataset with ScienceQA-style or SEED-Bench-style fields.
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` with either field layout.

Field mapping (documented in docs/evaluation.md):

- ScienceQA rows (``image``, ``question``, ``choices``, ``answer`` index, ``hint``, ``category``) go through
  :func:`lowrank_kit.data.sources.items_from_rows`; rows without an image are text questions and are
  left out, as in VLMEvalKit's ScienceQA-IMG.
- SEED-Bench rows (``image`` — a list of frames, one for image questions —, ``question``,
  ``choice_a`` .. ``choice_d``, ``answer`` letter, ``data_type``, ``question_type_id``, ``question_id``):
  only ``data_type == "image"`` rows are kept (SEED-Bench-IMG); the category is the evaluation dimension
  named by ``question_type_id`` (1-9, the names VLMEvalKit's SEEDBench_IMG uses).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowrank_kit.data.items import VQAItem
from lowrank_kit.data.sources import items_from_rows
from lowrank_kit.data.synthetic import generate_items
from lowrank_kit.data.tsv import load_tsv
from lowrank_kit.eval.engine import EvaluationError

log = logging.getLogger(__name__)

VLMEVAL_DATASETS = ("ScienceQA_TEST", "ScienceQA_VAL", "SEEDBench_IMG")
HF_DATASETS = {"scienceqa": "derek-thomas/ScienceQA", "seedbench": "lmms-lab/SEED-Bench"}
DEFAULT_SPLIT = "test"
# SEED-Bench's evaluation dimensions by question_type_id (1-9 are the image dimensions).
SEED_DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
    10: "Action Recognition",
    11: "Action Prediction",
    12: "Procedure Understanding",
}
SEED_FIELDS = ("question", "choice_a", "choice_b", "answer")


@dataclass
class EvalData:
    """Items to evaluate and where they came from."""

    name: str
    items: list[VQAItem]
    source: str  # testbed, vlmeval, tsv, hf, disk


def lmu_data_root() -> Path:
    """VLMEvalKit's data folder: ``$LMUData`` when it names an existing folder, else ``~/LMUData``."""
    env = os.environ.get("LMUData")  # noqa: SIM112 (VLMEvalKit spells it so)
    if env and Path(env).expanduser().is_dir():
        return Path(env).expanduser()
    return Path.home() / "LMUData"


def _choices() -> str:
    return (
        f"testbed, {', '.join(VLMEVAL_DATASETS)} (from $LMUData), {', '.join(HF_DATASETS)}, "
        "hf:<dataset id>, a TSV file or a save_to_disk directory"
    )


def _seed_rows_to_items(rows: Sequence[dict[str, Any]], origin: str) -> list[VQAItem]:
    items, other = [], 0
    for i, row in enumerate(rows):
        if str(row.get("data_type", "image")) != "image":
            other += 1
            continue
        image = row.get("image")
        if isinstance(image, list | tuple):
            image = image[0] if image else None
        if image is None:
            raise EvaluationError(f"{origin} row {i}: an image question without an image")
        options = []
        for key in ("choice_a", "choice_b", "choice_c", "choice_d", "choice_e"):
            if row.get(key) in (None, ""):
                break
            options.append(str(row[key]))
        kind = row.get("question_type_id")
        try:
            category = SEED_DIMENSIONS.get(int(kind), str(kind)) if kind is not None else ""
        except (TypeError, ValueError):
            category = str(kind)
        try:
            items.append(
                VQAItem(
                    image=image.convert("RGB"),
                    question=str(row["question"]),
                    options=options,
                    answer=str(row["answer"]).strip().upper(),
                    category=category,
                    index=row.get("question_id", i),
                )
            )
        except ValueError as err:
            raise EvaluationError(f"{origin} row {i}: {err}") from None
    if not items:
        raise EvaluationError(f"{origin} has no image questions ({other} rows of other data types)")
    if other:
        log.info(
            "%s: evaluating %d image questions, leaving out %d video questions", origin, len(items), other
        )
    return items


def items_from_dataset(rows: Sequence[dict[str, Any]], origin: str) -> list[VQAItem]:
    """Items from ``datasets`` rows with ScienceQA-style or SEED-Bench-style fields (see the module docstring)."""

    if len(rows) == 0:
        raise EvaluationError(f"{origin} is empty")
    columns = set(getattr(rows, "column_names", None) or rows[0].keys())
    if all(f in columns for f in SEED_FIELDS):
        return _seed_rows_to_items(rows, origin)
    if "choices" in columns or "options" in columns:
        return items_from_rows(rows, origin)
    raise EvaluationError(
        f"{origin} has the fields {', '.join(sorted(columns))}; expected ScienceQA-style rows (image, question, "
        "choices, answer) or SEED-Bench-style rows (image, question, choice_a..choice_d, answer)"
    )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else 'no message'}"


def _from_hub(dataset_id: str, split: str) -> list[VQAItem]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # datasets raises anything from ConnectionError to DatasetNotFoundError
        raise EvaluationError(
            f"cannot load dataset {dataset_id!r} split {split!r} ({_one_line(err)}); it needs the Hugging Face "
            "hub (or its local cache), or pass a save_to_disk directory"
        ) from None
    return items_from_dataset(ds, repr(dataset_id))


def _from_disk(path: Path, split: str) -> list[VQAItem]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises anything from FileNotFoundError to IndexError here
        raise EvaluationError(
            f"cannot read dataset directory {str(path)!r} with datasets {datasets.__version__} ({_one_line(err)}); "
            "write it with Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise EvaluationError(
                f"dataset directory {str(path)!r} has no split {split!r}; splits: {', '.join(ds)}"
            )
        ds = ds[split]
    return items_from_dataset(ds, repr(str(path)))


def load_eval_data(data: str, *, limit: int | None = None, split: str | None = None) -> EvalData:
    """Resolve ``--data`` (see the module docstring); ``limit`` keeps the first N items."""

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvaluationError(f"--limit must be a positive integer, got {limit!r}")
    if not isinstance(data, str) or not data:
        raise EvaluationError(f"--data must name a dataset; choices: {_choices()}")
    split_name = split or DEFAULT_SPLIT
    path = Path(data).expanduser()
    if data == "testbed":
        items, source = generate_items(split or "test"), "testbed"
    elif data in HF_DATASETS:
        items, source = _from_hub(HF_DATASETS[data], split_name), "hf"
    elif data.startswith("hf:"):
        items, source = _from_hub(data[3:], split_name), "hf"
    elif path.is_dir():
        items, source = _from_disk(path, split_name), "disk"
    elif path.suffix.lower() == ".tsv" or path.is_file():
        if not path.is_file():
            raise EvaluationError(f"TSV file {data!r} does not exist")
        items, source = load_tsv(path), "tsv"
    elif "/" in data or os.sep in data:
        raise EvaluationError(
            f"--data {data!r} is neither an existing file nor a directory; choices: {_choices()}"
        )
    else:
        tsv = lmu_data_root() / f"{data}.tsv"
        if not tsv.is_file():
            if data in VLMEVAL_DATASETS:
                raise EvaluationError(
                    f"VLMEvalKit dataset {data} is not at {str(tsv)!r}; download {data}.tsv into $LMUData "
                    "(VLMEvalKit does so on its first run) or set LMUData to the folder that holds it"
                )
            raise EvaluationError(f"unknown dataset {data!r} (no {str(tsv)!r}); choices: {_choices()}")
        items, source = load_tsv(tsv), "vlmeval"
    if not items:
        raise EvaluationError(f"dataset {data!r} has no items")
    if limit is not None:
        items = items[:limit]
    return EvalData(name=data, items=items, source=source)
