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

from lowrank_kit.data.items import LETTERS, VQAItem
from lowrank_kit.data.samples import make_sample
from lowrank_kit.data.synthetic import generate_items
from lowrank_kit.data.text import parse_corpus, text_calibration_samples
from lowrank_kit.data.tsv import load_tsv
from lowrank_kit.errors import CalibrationError
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

# The real defaults of `source: auto` (default_calibration): the paper calibrates VLMs on ScienceQA's
# train image questions; text models calibrate on wikitext-2's train split, as SVD-LLM, ASVD and Palu do.
SCIENCEQA = "derek-thomas/ScienceQA"
WIKITEXT2 = "hf:Salesforce/wikitext:wikitext-2-raw-v1"

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
        return generate_items(spec.split, spec.num_samples, seed=spec.seed)
    if spec.source == "tsv":
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
            ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
        except Exception as err:  # datasets raises anything from ConnectionError to ValueError offline
            raise CalibrationError(
                f"calibration needs the dataset {spec.dataset!r} (split {spec.split!r}), which could not be "
                f"loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}); "
                "provide it as a hub cache (download it once, then HF_DATASETS_OFFLINE=1), as a directory "
                "written by Dataset.save_to_disk (--calib-source hf --calib-path DIR) or as a VLMEvalKit TSV "
                "(--calib-source tsv --calib-path FILE)"
            ) from None
        origin = repr(spec.dataset)
    return items_from_rows(ds, origin)


def select(items: list, n: int, seed: int) -> list:
    """``n`` items chosen by ``seed`` (all of them, in a seeded order, when fewer exist)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n]]


def default_calibration(*, testbed: bool, text_only: bool, corpus: str | None = None) -> dict[str, Any]:
    """What ``source: auto`` means for a model: the testbed's own generator for the testbed, ScienceQA's
    image questions for a VLM (the paper's setting), wikitext-2 for a text model, and ``corpus`` for a
    model that names its own (a packaged model, which runs offline, names the built-in ``text:pydoc``)."""
    if testbed:
        return {"source": "testbed", "dataset": None, "split": "train"}
    if corpus is not None:
        return {"source": "text", "dataset": corpus, "split": "train"}
    if text_only:
        return {"source": "text", "dataset": WIKITEXT2, "split": "train"}
    return {"source": "hf", "dataset": SCIENCEQA, "split": "train"}


def resolve_calibration(spec, *, testbed: bool, text_only: bool, corpus: str | None = None):
    """``spec`` with ``source: auto`` replaced by the model's real default (:func:`default_calibration`).

    A source the recipe names is kept as it is: the testbed generator for another model is used only when
    the recipe says ``source: testbed`` (then a warning says so). A text corpus for a VLM calibrates its
    language model on text alone, which is allowed; ScienceQA-style image questions for a text model are
    not, since it cannot see the images.
    """
    if spec.source == "auto":
        return spec.model_copy(
            update=default_calibration(testbed=testbed, text_only=text_only, corpus=corpus)
        )
    if spec.source == "testbed" and not testbed:
        log.warning(
            "calibrating a model that is not the testbed on the testbed's synthetic pictures, as the recipe "
            "says (calibration.source: testbed); real data (source: auto) is the default"
        )
    if text_only and spec.source in ("hf", "tsv"):
        raise CalibrationError(
            f"calibration source {spec.source!r} holds image questions, but this is a text-only model; use "
            f"source 'text' (a corpus such as {WIKITEXT2} or text:pydoc) or 'auto'"
        )
    return spec


def build_calibration(spec, processor: Any, adapter, *, reporter: Reporter = NULL_REPORTER) -> list:
    """Calibration samples for ``spec`` (resolved: not ``auto``) through ``processor`` and ``adapter``."""
    if spec.source == "auto":
        raise CalibrationError("calibration source 'auto' must be resolved for the model first")
    if spec.source == "text":
        with reporter.stage("calibration data", total=1) as stage:
            corpus = parse_corpus(spec.dataset)
            # A dataset has splits (calibration reads `split`); a text corpus is cut into parts instead.
            split = spec.split if corpus.kind in ("hub", "disk") else None
            samples = text_calibration_samples(
                processor, corpus, spec.num_samples, spec.max_length, spec.seed, split=split
            )
            stage.advance()
        return samples
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
