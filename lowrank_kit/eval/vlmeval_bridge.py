"""``--backend vlmeval``: score a lowrank_kit model with VLMEvalKit's own inference loop and exact matching.

The model is wrapped as a VLMEvalKit model (a subclass of ``vlmeval.vlm.base.BaseModel`` whose
``generate_inner`` runs greedy decoding through the adapter's chat template, one item at a time, as
VLMEvalKit calls it). VLMEvalKit then does the rest: ``vlmeval.inference.infer_data_job`` walks the
dataset and writes the predictions file, and the dataset's ``evaluate(..., model="exact_matching")``
extracts the answers (``can_infer``) and reports overall and per-category accuracy.

Prompts: with ``prompt_style="letter"`` the wrapper builds VLMEvalKit's LLaVA-style multiple-choice
prompt itself (``use_custom_prompt`` for MCQ data, as VLMEvalKit's LLaVA wrappers do); with
``"dataset"`` VLMEvalKit's ``ImageMCQDataset.build_prompt`` is used. Either way the prompt text equals
:func:`lowrank_kit.data.items.build_mcq_prompt` of the same style, so both backends ask the same question.

Data: a VLMEvalKit dataset name (``ScienceQA_TEST``, ...) is evaluated from its TSV in ``$LMUData``;
anything else ``--data`` accepts (the testbed, a TSV path, a ``datasets`` source, or a ``--limit``
subset) is written as a TSV into a temporary ``LMUData`` folder and evaluated as a VLMEvalKit custom
multiple-choice dataset, scored by the same ``ImageMCQDataset.evaluate``.

VLMEvalKit is not on PyPI under its own name: install it from its git repository (docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from lowrank_kit.data.items import LETTERS, PROMPT_STYLES, VQAItem, build_mcq_prompt
from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.eval.datasets import VLMEVAL_DATASETS, lmu_data_root, load_eval_data
from lowrank_kit.eval.engine import EvaluationError, _tokenizer, generate_texts, generation_settings
from lowrank_kit.models.families.common import chat_template_inputs
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

MODEL_NAME = "lowrank_kit"
INSTALL_HINT = (
    "install VLMEvalKit from its git repository: `git clone https://github.com/open-compass/VLMEvalKit && "
    "pip install -e VLMEvalKit` (see docs/evaluation.md)"
)


def vlmeval_available() -> bool:

    return importlib.util.find_spec("vlmeval") is not None


def require_vlmeval():
    """VLMEvalKit's modules the bridge uses, or a one-line error saying how to install VLMEvalKit."""
    try:
        import vlmeval  # noqa: F401
        from vlmeval.dataset import build_dataset
        from vlmeval.inference import infer_data_job
        from vlmeval.smp import load
        from vlmeval.vlm.base import BaseModel
    except ImportError as err:
        raise EvaluationError(
            f"--backend vlmeval needs VLMEvalKit, which cannot be imported ({err}); {INSTALL_HINT}"
        ) from None
    return BaseModel, build_dataset, infer_data_job, load


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set environment variables for the duration (a None value leaves that variable alone)."""
    old = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_vlmeval_model(loaded, *, max_new_tokens: int, prompt_style: str):
    """``loaded`` (a :class:`~lowrank_kit.loading.LoadedModel`) as a VLMEvalKit model instance."""

    BaseModel, *_ = require_vlmeval()
    generation = generation_settings(loaded.model, loaded.processor, max_new_tokens)
    build = loaded.adapter.build_inputs or chat_template_inputs
    tokenizer = _tokenizer(loaded.processor)

    class LowRankVLM(BaseModel):
        INTERLEAVE = False
        allowed_types = ["text", "image"]

        def __init__(self) -> None:
            super().__init__()
            self.outputs: list[str] = []  # what generate_inner returned, in call order

        def use_custom_prompt(self, dataset):
            from vlmeval.dataset import DATASET_TYPE

            return prompt_style == "letter" and DATASET_TYPE(dataset) == "MCQ"

        def build_prompt(self, line, dataset=None):
            paths = self.dump_image(line, dataset)
            options = [str(line[c]) for c in LETTERS if c in line and not pd.isna(line[c])]
            hint = line["hint"] if "hint" in line and not pd.isna(line["hint"]) else None
            # Only the text fields matter to the prompt; image and answer are placeholders.
            item = VQAItem(Image.new("RGB", (1, 1)), str(line["question"]), options, "A", hint=hint)
            message = [{"type": "image", "value": p} for p in paths]
            message.append({"type": "text", "value": build_mcq_prompt(item, "letter")})
            return message

        def generate_inner(self, message, dataset=None):
            images = [Image.open(m["value"]).convert("RGB") for m in message if m["type"] == "image"]
            text = "\n".join(m["value"] for m in message if m["type"] == "text")
            inputs = build(loaded.processor, images, [{"role": "user", "content": text}])
            texts, _, _ = generate_texts(loaded.model, [inputs], tokenizer, generation)
            self.outputs.append(texts[0])
            return texts[0]

    return LowRankVLM()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "data"


def _summary_from(acc, items) -> dict[str, Any]:
    """Overall and per-category accuracy from VLMEvalKit's report (one row per split)."""
    row = acc.iloc[0]
    counts: dict[str, int] = {}
    for it in items:
        counts[it.category] = counts.get(it.category, 0) + 1
    per_category = {}
    for column in acc.columns:
        if column in ("split", "Overall"):
            continue
        per_category[str(column)] = {"accuracy": float(row[column]), "n": counts.get(str(column))}
    n = len(items)
    accuracy = float(row["Overall"])
    return {
        "accuracy": accuracy,
        "n": n,
        "correct": round(accuracy * n),
        "per_category": per_category,
        "nll": None,
        "kl": None,
    }


def evaluate_with_vlmeval(
    loaded,
    data: str,
    *,
    limit: int | None = None,
    split: str | None = None,
    max_new_tokens: int = 32,
    prompt_style: str = "letter",
    reporter: Reporter = NULL_REPORTER,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``loaded`` on ``data`` through VLMEvalKit (see the module docstring); returns a summary."""

    if prompt_style not in PROMPT_STYLES:
        raise EvaluationError(f"unknown prompt style {prompt_style!r}; available: {', '.join(PROMPT_STYLES)}")
    _, build_dataset, infer_data_job, load = require_vlmeval()
    import vlmeval

    t0 = time.perf_counter()
    evaldata = load_eval_data(data, limit=limit, split=split)
    with contextlib.ExitStack() as stack:
        if data in VLMEVAL_DATASETS and limit is None:
            name, folder = data, None
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lowrank-lmudata-")))
            name = f"lowrank_{_safe_name(Path(data).stem if Path(data).suffix else data)}"
            if limit is not None:
                name += f"_first{limit}"
            # VLMEvalKit groups scores by a `split` column; give every row one so none is dropped as NaN.
            rows = [it if it.split else _with_split(it, "test") for it in evaldata.items]
            write_tsv(rows, folder / f"{name}.tsv")
        work = (
            Path(work_dir)
            if work_dir is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lowrank-vlmeval-")))
        )
        work.mkdir(parents=True, exist_ok=True)
        # Predictions as TSV (VLMEvalKit's PRED_FORMAT) unless the user chose: no Excel writer needed.
        stack.enter_context(
            _environ(
                LMUData=str(folder) if folder else None, PRED_FORMAT=os.environ.get("PRED_FORMAT") or "tsv"
            )
        )
        dataset = build_dataset(name)
        if dataset is None:
            raise EvaluationError(
                f"VLMEvalKit could not build dataset {name!r} from {str((folder or lmu_data_root()) / (name + '.tsv'))!r}"
            )
        model = make_vlmeval_model(loaded, max_new_tokens=max_new_tokens, prompt_style=prompt_style)
        with reporter.stage(f"VLMEvalKit inference on {name}", total=None):
            infer_data_job(
                model=model, work_dir=str(work), model_name=MODEL_NAME, dataset=dataset, verbose=False
            )
        try:
            from vlmeval.smp.file import get_pred_file_path

            pred_file = get_pred_file_path(str(work), MODEL_NAME, dataset.dataset_name)
        except ImportError:  # VLMEvalKit before 2025 always wrote .xlsx
            pred_file = str(work / f"{MODEL_NAME}_{dataset.dataset_name}.xlsx")
        acc = dataset.evaluate(pred_file, model="exact_matching", nproc=1)
        predictions = load(pred_file)
    summary = _summary_from(acc, evaldata.items)
    summary["items"] = [
        {"index": str(i), "prediction": str(p)}
        for i, p in zip(predictions["index"], predictions["prediction"])
    ]
    summary.update(
        {
            "seconds": round(time.perf_counter() - t0, 3),
            "vlmeval_version": getattr(vlmeval, "__version__", "unknown"),
            "vlmeval_dataset": name,
            "generate_calls": len(model.outputs),
            # VLMEvalKit stores predictions in a TSV and reads them back with pandas, which turns "3" into
            # "3.0" and "" into "nan"; `items` are those, as it scored them; these are the raw outputs.
            "raw_predictions": model.outputs,
        }
    )
    return summary


def _with_split(item, split: str):

    return dataclasses.replace(item, split=split)
