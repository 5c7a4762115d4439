"""Head-to-head comparison: compress one model by several recipes, score each cell on the same data.

:func:`run_grid` is the one mechanism. It loads the model once, scores it uncompressed (the FP16 entry,
the reference for the KL column), builds each calibration set once (cells with the same calibration
recipe see the same samples), and then for each row compresses the loaded model in place
(:func:`lowrank_kit.pipeline.compress`), scores it on the same data and puts it back
(:class:`lowrank_kit.snapshot.ModelSnapshot`): no second copy of the model on its device. A row (:class:`GridRow`) is a
decomposer at a ratio, a quantization scheme (optionally with the quantizers that run it), or both.

How a model is scored is the grid's *evaluation kind*, chosen once from the data and the model by the
rule of ``lowrank eval`` (:func:`evaluation_kind`):

- ``accuracy``: multiple-choice VQA (:func:`lowrank_kit.eval.engine.evaluate`): accuracy, the NLL of the
  correct letter and the KL of the letter distribution from the FP16 model's per-item results, which the
  results file keeps;
- ``perplexity``: a text corpus (``text:pydoc``, ``text:PATH``, or ``hf:DATASET[:CONFIG]`` for a text-only
  model): perplexity and per-token KL (:func:`lowrank_kit.eval.perplexity.perplexity`) on the corpus's
  evaluation part, cut into windows of ``seq_len`` tokens; the reference is the uncompressed model itself,
  restored batch by batch while a cell is scored.

Every cell also records the decode layout its method produced (:func:`decode_layout`).

:func:`run_accuracy_grid` is ``lowrank bench accuracy``: methods × ratios, every cell quantized by one
scheme when asked. ``benchmarks/quant_accuracy.py`` runs its low-rank + low-precision rows through
:func:`run_grid` as well, into a results file of its own format (:class:`ResultsFile`).

Resuming: the results JSON is rewritten atomically after every cell. Each cell stores a fingerprint of
what it depends on (model content, data, resolved recipe, evaluation kind and settings, lowrank_kit's
version); a rerun with the same results file keeps the cells whose fingerprint matches and recomputes the
others. The markdown tables of :func:`run_accuracy_grid` and its plot are written from the JSON at the
end: for accuracy, Table 1 of the WSVD paper (methods × ρ1 with an average column and the FP16 row, ρ2
under each accuracy) and accuracy against ρ1; for perplexity, methods × ρ1 (perplexity, KL, ρ1, ρ2,
layout), the same cells sorted by ρ2, and perplexity against ρ1 and against ρ2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

import lowrank_kit
from lowrank_kit.calib_cache import key_digest, model_digest
from lowrank_kit.data.sources import build_calibration, resolve_calibration
from lowrank_kit.data.text import VALID_FORMS, corpus_text, parse_corpus, token_windows
from lowrank_kit.errors import unknown_name
from lowrank_kit.eval.cache import EvalCache, item_digest
from lowrank_kit.eval.datasets import load_eval_data
from lowrank_kit.eval.engine import EvalResult, EvaluationError, ItemResult, evaluate
from lowrank_kit.eval.perplexity import perplexity
from lowrank_kit.loading import LoadedModel, calibration_context, load_model, model_calibration_context
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.modules import JointLowRankProjection, LowRankLinear, PerHeadLowRankLinear
from lowrank_kit.pipeline import compress, needs_calibration
from lowrank_kit.progress import NULL_REPORTER, Reporter
from lowrank_kit.ratios import kv_projections
from lowrank_kit.recipe import Recipe, parse_method, recipe_from_flags, resolve_recipe
from lowrank_kit.registry import get_registry
from lowrank_kit.snapshot import ModelSnapshot

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_rho1.png"
PERPLEXITY_PLOT_FILE = "perplexity_vs_rho.png"
DEFAULT_METHODS = ("svd", "asvd", "svdllm", "qsvd", "wsvd")
DEFAULT_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)
# Evaluation kinds (:func:`evaluation_kind`).
ACCURACY = "accuracy"
PERPLEXITY = "perplexity"


@dataclass
class GridSpec:
    """What every cell of a grid shares: the model, the data, evaluation and calibration settings.

    ``methods`` × ``ratios`` (each quantized by ``quant`` when given) are the rows of
    :func:`run_accuracy_grid`; :func:`run_grid` takes its rows explicitly. ``max_new_tokens`` and
    ``prompt_style`` apply to multiple-choice data, ``seq_len`` (tokens per window) to a text corpus,
    where ``limit`` counts windows. The ``calib_*`` fields are the recipe's calibration flags
    (:func:`lowrank_kit.recipe.recipe_from_flags`).
    """

    model: str
    methods: Sequence[str] = DEFAULT_METHODS
    ratios: Sequence[float] = DEFAULT_RATIOS
    quant: str | None = None
    data: str = "testbed"
    split: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    prompt_style: str = "letter"
    device: str = "cpu"
    dtype: torch.dtype | None = None
    calib_samples: int | None = None
    seed: int | None = None
    calib_source: str | None = None
    calib_path: str | None = None
    calib_dataset: str | None = None
    calib_config: str | None = None
    calib_split: str | None = None
    calib_max_length: int | None = None
    seq_len: int = 512


@dataclass(frozen=True)
class GridRow:
    """One compressed cell: a decomposer at ρ1, a quantization scheme, or both.

    ``method``: a decomposer, optionally with parameters (:func:`parse_method`); ``quant_methods``: the
    quantizers the scheme runs, in order, instead of its own.
    """

    method: str | None = None
    ratio: float | None = None
    quant: str | None = None
    quant_methods: tuple[str, ...] | None = None

    def recipe(self, spec: GridSpec) -> Recipe:
        name, params = parse_method(self.method) if self.method is not None else (None, {})
        return resolve_recipe(
            recipe_from_flags(
                model=spec.model,
                method=name,
                params=params,
                ratio=self.ratio,
                quant=self.quant,
                quant_methods=self.quant_methods,
                calib_samples=spec.calib_samples,
                seed=spec.seed,
                calib_source=spec.calib_source,
                calib_path=spec.calib_path,
                calib_dataset=spec.calib_dataset,
                calib_config=spec.calib_config,
                calib_split=spec.calib_split,
                calib_max_length=spec.calib_max_length,
            )
        )


def check_methods(methods: Sequence[str]) -> None:
    names = get_registry().names("decomposer")
    for m in methods:
        name, _ = parse_method(m)
        if name not in names:
            raise unknown_name("method", name, names)


def cell_key(method: str, ratio: float) -> str:
    return f"{method}@{ratio:g}"


# -- results file ----------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    _write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(Path(path), lambda tmp: tmp.write_text(text))


class ResultsFile:
    """Where a grid keeps its results: rewritten atomically after every cell, read back to resume.

    This one stores :func:`run_grid`'s results as they are. A benchmark with a file format of its own
    overrides :meth:`encode` (results → file) and :meth:`decode` (file → the results to resume from:
    ``fp16`` with its ``items`` to reuse the reference, ``cells`` with their fingerprints).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def encode(self, results: dict[str, Any]) -> dict[str, Any]:
        return results

    def decode(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("version") != RESULTS_VERSION:
            log.warning("results file %s is from another format version; starting the grid over", self.path)
            return {}
        return data

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            log.warning("results file %s is unreadable (%s); starting the grid over", self.path, err)
            return {}
        if not isinstance(data, dict):
            log.warning("results file %s holds no results object; starting the grid over", self.path)
            return {}
        return self.decode(data)

    def save(self, results: dict[str, Any]) -> None:
        write_json_atomic(self.path, self.encode(results))


# -- evaluation kinds ------------------------------------------------------------------------------
def evaluation_kind(spec: GridSpec) -> str:
    """:data:`PERPLEXITY` for a text corpus (``text:...``) or a text-only model (read from its config
    without loading it), else :data:`ACCURACY`: the rule of ``lowrank eval``."""
    if spec.data.startswith("text:"):
        return PERPLEXITY
    context = calibration_context(spec.model)
    return PERPLEXITY if context is not None and context["text_only"] else ACCURACY


def _summary(result: EvalResult) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("settings", None)
    return data


def _fp16_reference(entry: dict[str, Any]) -> EvalResult:
    return EvalResult(items=[ItemResult(**row) for row in entry["items"]])


class _MultipleChoice:
    """Accuracy, NLL and letter KL on multiple-choice VQA items. The reference is the FP16 model's
    per-item results, which the FP16 entry keeps (``items``), so a resumed grid need not evaluate it again.

    An evaluation kind is built before the model is loaded (bad data fails first), bound to the loaded
    model (:meth:`bind`, which returns the digest of the data it scores), then scores the FP16 model
    (:meth:`score_reference`, or :meth:`reuse_reference` of a finished entry) and each compressed cell
    (:meth:`score`); every score dict carries its ``seconds``.
    """

    kind = ACCURACY

    def __init__(self, spec: GridSpec, reporter: Reporter, cache: EvalCache | None) -> None:
        self.spec, self.reporter, self.cache = spec, reporter, cache
        self.data = load_eval_data(spec.data, limit=spec.limit, split=spec.split)
        self.n = len(self.data.items)
        self.settings = {
            "batch_size": spec.batch_size,
            "max_new_tokens": spec.max_new_tokens,
            "prompt_style": spec.prompt_style,
        }
        self.reference: EvalResult | None = None
        self.loaded: LoadedModel | None = None

    def bind(self, loaded: LoadedModel) -> str:
        if loaded.adapter.text_only:
            raise EvaluationError(
                f"model {self.spec.model!r} is a text-only language model, so it cannot answer the image "
                f"questions of {self.spec.data!r}; give a text corpus for perplexity instead (--data "
                "text:pydoc, text:PATH or hf:DATASET[:CONFIG])"
            )
        self.loaded = loaded
        return key_digest({"data": self.spec.data, "items": [item_digest(it) for it in self.data.items]})

    def _evaluate(self, model: nn.Module, name: str, reference: EvalResult | None = None) -> EvalResult:
        return evaluate(
            model,
            self.loaded.processor,
            self.loaded.adapter,
            self.data.items,
            batch_size=self.spec.batch_size,
            max_new_tokens=self.spec.max_new_tokens,
            prompt_style=self.spec.prompt_style,
            reference=reference,
            reporter=self.reporter,
            cache=self.cache,
            description=f"evaluate {name}",
        )

    def score_reference(self) -> dict[str, Any]:
        self.reference = self._evaluate(self.loaded.model, "uncompressed")
        return {**_summary(self.reference), "items": [r.to_dict() for r in self.reference.items]}

    def reuse_reference(self, entry: dict[str, Any]) -> bool:
        if "items" not in entry:
            return False
        self.reference = _fp16_reference(entry)
        return True

    def score(self, model: nn.Module, name: str, original: Any = None) -> dict[str, Any]:
        return _summary(self._evaluate(model, name, reference=self.reference))


class _Perplexity:
    """Perplexity and per-token KL on the evaluation part of a text corpus, in windows of ``seq_len``
    tokens (``limit``: the first windows only). The reference is the uncompressed model, put back into
    its original state batch by batch (the cell compresses it in place), so the FP16 entry needs no
    per-item results. The methods are those of :class:`_MultipleChoice`."""

    kind = PERPLEXITY

    def __init__(self, spec: GridSpec, reporter: Reporter) -> None:
        if spec.seq_len < 2:
            raise EvaluationError(f"--seq-len must be at least 2 tokens, got {spec.seq_len}")
        if spec.limit is not None and spec.limit < 1:
            raise EvaluationError(f"--limit must be at least 1 window, got {spec.limit}")
        if not spec.data.startswith(("text:", "hf:")):
            raise EvaluationError(
                f"model {spec.model!r} is a text-only language model, scored by perplexity on a text corpus; "
                f"--data must be one ({VALID_FORMS}), got {spec.data!r}"
            )
        self.spec, self.reporter = spec, reporter
        self.corpus = parse_corpus(spec.data)
        self.settings = {"batch_size": spec.batch_size, "seq_len": spec.seq_len}
        self.n = 0
        self.windows: torch.Tensor | None = None
        self.reference: nn.Module | None = None

    def bind(self, loaded: LoadedModel) -> str:
        if loaded.processor is None:
            raise EvaluationError(f"model {self.spec.model!r} has no tokenizer, so text cannot be fed to it")
        text = corpus_text(self.corpus, "evaluation", split=self.spec.split)
        self.windows = token_windows(loaded.processor, text, self.spec.seq_len, max_windows=self.spec.limit)
        self.n = self.windows.shape[0]
        self.reference = loaded.model  # scored before any cell compresses it
        windows = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        return key_digest({"data": self.spec.data, "split": self.spec.split, "windows": windows})

    def _perplexity(self, model: nn.Module, original: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = perplexity(
            model,
            self.windows,
            batch_size=self.spec.batch_size,
            reference_state=original,
            reporter=self.reporter,
        )
        return {**result, "seconds": round(time.perf_counter() - t0, 3)}

    def score_reference(self) -> dict[str, Any]:
        return self._perplexity(self.reference, None)  # its KL from itself is 0: recorded as None

    def reuse_reference(self, entry: dict[str, Any]) -> bool:
        return True

    def score(self, model: nn.Module, name: str, original: Any = None) -> dict[str, Any]:
        """``original``: a context in which ``model`` is the uncompressed reference again."""
        return self._perplexity(model, original)


def _evaluation(spec: GridSpec, reporter: Reporter, cache: EvalCache | None) -> _MultipleChoice | _Perplexity:
    if evaluation_kind(spec) == PERPLEXITY:
        return _Perplexity(spec, reporter)
    return _MultipleChoice(spec, reporter, cache)


# -- cells -----------------------------------------------------------------------------------------
def _projection_layout(mod: nn.Module) -> str:
    if isinstance(mod, PerHeadLowRankLinear):
        return "per_head"
    if isinstance(mod, JointLowRankProjection):
        return "joint"
    if isinstance(mod, LowRankLinear):
        return "shared"
    return "dense"


def decode_layout(model: nn.Module, adapter: ModelAdapter) -> str:
    """How the K/V cache of ``model`` is laid out for decoding, from its K and V modules:

    ``per_head`` (a latent per KV head, :class:`~lowrank_kit.modules.PerHeadLowRankLinear`: WSVD),
    ``shared`` (one latent per projection read by all its heads, :class:`~lowrank_kit.modules.LowRankLinear`:
    SVD, ASVD, SVD-LLM), ``joint`` (one latent shared by K and V, :class:`~lowrank_kit.modules.JointLowRankProjection`:
    QSVD) or ``dense`` (not decomposed). A model whose layers or K and V differ gives its kinds joined by
    ``+`` (``dense+per_head``).
    """
    kinds: set[str] = set()
    for k, v, shared in kv_projections(model, adapter):
        kinds.update(("joint",) if shared else (_projection_layout(k), _projection_layout(v)))
    return "+".join(sorted(kinds))


def _cell(
    row: GridRow, report: dict[str, Any], layout: str, scores: dict[str, Any], compress_seconds: float
) -> dict[str, Any]:
    """What a results file keeps of a compressed cell: the row, the measured ratios, cache and decode
    layout, the scores of the grid's evaluation kind."""
    quant = report.get("quantize") or {}
    qat = quant.get("qat")
    return {
        "method": row.method,
        "ratio": row.ratio,
        "rho1": report.get("rho1"),
        "rho2": report.get("rho2"),
        "layout": layout,
        "quant": report.get("quant"),
        "quant_methods": quant.get("methods"),
        "cache_ratio_vs_fp16": quant.get("cache_ratio_vs_fp16", report.get("rho2")),
        "cache_ratio_vs_fp16_with_scales": quant.get("cache_ratio_vs_fp16_with_scales", report.get("rho2")),
        "weight_bytes": report.get("weight_bytes"),
        "original_weight_bytes": report.get("original_weight_bytes"),
        "qat": qat and {k: qat[k] for k in ("mean_loss_before", "mean_loss_after")},
        "compress_seconds": round(compress_seconds, 3),
        "eval_seconds": scores["seconds"],
        **scores,
    }


# -- the grid --------------------------------------------------------------------------------------
def run_grid(
    spec: GridSpec,
    rows: Mapping[str, GridRow],
    results_file: ResultsFile,
    *,
    header: Mapping[str, Any] | None = None,
    reporter: Reporter = NULL_REPORTER,
    eval_cache: EvalCache | None = None,
    calib_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score the uncompressed model and every row of ``rows`` (key → row), resuming from ``results_file``.

    Returns ``{"version", "kind", "model", "data", "n", **header, "settings", "fp16", "cells", "seconds"}``:
    ``kind`` the evaluation kind (:func:`evaluation_kind`), ``n`` the items or windows scored, ``fp16`` the
    uncompressed model's scores (with its per-item results for multiple-choice data), ``cells`` one entry
    per key of ``rows`` (see :func:`_cell`), each with the fingerprint a rerun compares.
    """
    t0 = time.perf_counter()
    recipes = {key: row.recipe(spec) for key, row in rows.items()}  # bad names fail before model work
    evaluation = _evaluation(spec, reporter, eval_cache)  # so does bad data
    loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device, reporter=reporter)
    data_digest = evaluation.bind(loaded)
    # `source: auto` becomes the model's real calibration data, as compress() would resolve it, so that
    # the fingerprints and the shared calibration sets see what the cells are calibrated on.
    config = loaded.model.config
    context = model_calibration_context(config, getattr(config, "_name_or_path", "") or "")
    recipes = {
        key: recipe.model_copy(update={"calibration": resolve_calibration(recipe.calibration, **context)})
        for key, recipe in recipes.items()
    }
    common = {
        "lowrank_kit": lowrank_kit.__version__,
        "model": model_digest(loaded.model),
        "data": data_digest,
        "kind": evaluation.kind,
        "eval": evaluation.settings,
        "device": torch.device(spec.device).type,
        "dtype": str(next(loaded.model.parameters()).dtype),
    }
    previous = results_file.load()
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "kind": evaluation.kind,
        "model": spec.model,
        "data": spec.data,
        "n": evaluation.n,
        **(header or {}),
        "settings": {
            **evaluation.settings,
            "limit": spec.limit,
            "device": spec.device,
            "dtype": common["dtype"],
        },
        "fp16": None,
        # Cells of an earlier run, kept only where their fingerprint still matches (checked below).
        "cells": dict(previous.get("cells") or {}),
    }

    with reporter.stage(f"{evaluation.kind} grid", total=len(recipes) + 1) as grid:
        fp16_fingerprint = key_digest({**common, "cell": "fp16"})
        old = previous.get("fp16")
        if old and old.get("fingerprint") == fp16_fingerprint and evaluation.reuse_reference(old):
            results["fp16"] = old
        else:
            results["fp16"] = {"fingerprint": fp16_fingerprint, **evaluation.score_reference()}
            results_file.save(results)
        grid.advance()

        calibrations: dict[str, list] = {}  # one sample set per calibration recipe
        for key, recipe in recipes.items():
            fingerprint = key_digest({**common, "recipe": recipe.to_dict(), "cell": key})
            old = results["cells"].get(key)
            if old and old.get("fingerprint") == fingerprint:
                log.info("%s: reusing the finished cell from %s", key, results_file.path)
                grid.advance()
                continue
            calibration = None
            if needs_calibration(recipe):
                calib_key = json.dumps(recipe.calibration.model_dump(mode="json"), sort_keys=True)
                if calib_key not in calibrations:
                    calibrations[calib_key] = build_calibration(
                        recipe.calibration, loaded.processor, loaded.adapter, reporter=reporter
                    )
                calibration = calibrations[calib_key]
            # The cell compresses the loaded model in place and puts it back afterwards: no second copy
            # on the device (quantizers rewrite tensors in place, so their original values wait in host
            # memory; decomposers only swap modules).
            model = loaded.model
            snapshot = ModelSnapshot(model, keep_values=bool(recipe.quantize))
            try:
                t_cell = time.perf_counter()
                compressed = compress(
                    model,
                    recipe,
                    adapter=loaded.adapter,
                    processor=loaded.processor,
                    calibration=calibration,
                    reporter=reporter,
                    device=spec.device,
                    cache_dir=calib_cache_dir,
                )
                compress_seconds = time.perf_counter() - t_cell
                layout = decode_layout(model, loaded.adapter)
                scores = evaluation.score(model, key, original=snapshot.original)
            finally:
                snapshot.restore()
            results["cells"][key] = {
                "fingerprint": fingerprint,
                **_cell(rows[key], compressed.report, layout, scores, compress_seconds),
            }
            del compressed, snapshot
            results_file.save(results)
            grid.advance()

    # Cells of an earlier run that this one does not ask for stay out.
    results["cells"] = {k: results["cells"][k] for k in recipes}
    results["seconds"] = round(time.perf_counter() - t0, 3)
    results_file.save(results)
    return results


def run_accuracy_grid(
    spec: GridSpec,
    output: str | Path,
    *,
    reporter: Reporter = NULL_REPORTER,
    eval_cache: EvalCache | None = None,
    calib_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) methods × ratios into ``output``; returns the results (also in ``output/results.json``),
    with the table in ``output/table.md`` and the plot in ``output/``:func:`plot_file`."""
    output = Path(output)
    methods = list(spec.methods)
    ratios = [float(r) for r in spec.ratios]
    check_methods(methods)
    rows = {
        cell_key(method, ratio): GridRow(method=method, ratio=ratio, quant=spec.quant)
        for method in methods
        for ratio in ratios
    }
    results = run_grid(
        spec,
        rows,
        ResultsFile(output / RESULTS_FILE),
        header={"quant": spec.quant, "methods": methods, "ratios": ratios},
        reporter=reporter,
        eval_cache=eval_cache,
        calib_cache_dir=calib_cache_dir,
    )
    write_table(results, output / TABLE_FILE)
    write_plot(results, output / plot_file(results))
    return results


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells as rows for ``--json``: every field but the fingerprint (method, ratio, rho1, rho2,
    layout, the scores: accuracy, nll, kl, ... or perplexity, nll, kl, tokens, windows, the times)."""
    out = []
    for key in results["cells"]:
        cell = results["cells"][key]
        out.append({k: v for k, v in cell.items() if k != "fingerprint"})
    return out


def plot_file(results: dict[str, Any]) -> str:
    """The plot's file name: accuracy against ρ1, or perplexity against ρ1 and ρ2."""
    return PERPLEXITY_PLOT_FILE if results.get("kind") == PERPLEXITY else PLOT_FILE


# -- table and plot --------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _fp16_label(results: dict[str, Any]) -> str:
    dtype = results.get("settings", {}).get("dtype", "").replace("torch.", "")
    return f"FP16 (uncompressed, {dtype})" if dtype else "FP16 (uncompressed)"


def _method_label(results: dict[str, Any], method: str) -> str:
    return method if not results.get("quant") else f"{method} + {results['quant']}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown of a grid's results. Accuracy: methods × ρ1 (accuracy %, ρ2 below), an Avg. column and the
    FP16 row. Perplexity: :func:`format_perplexity_tables`."""
    if results.get("kind") == PERPLEXITY:
        return format_perplexity_tables(results)
    ratios = results["ratios"]
    fp16 = results["fp16"]
    header = "| Method | " + " | ".join(f"ρ1 = {r:g}" for r in ratios) + " | Avg. |"
    lines = [header, "|" + "---|" * (len(ratios) + 2)]
    fp16_acc = _pct(fp16["accuracy"])
    lines.append(f"| {_fp16_label(results)} | " + " | ".join(fp16_acc for _ in ratios) + f" | {fp16_acc} |")
    for method in results["methods"]:
        cells, accs = [], []
        for r in ratios:
            cell = results["cells"].get(cell_key(method, r))
            if cell is None:
                cells.append("-")
                continue
            accs.append(cell["accuracy"])
            rho2 = "-" if cell.get("rho2") is None else f"{cell['rho2']:.2f}"
            cells.append(f"{_pct(cell['accuracy'])}<br><sub>ρ2 {rho2}</sub>")
        avg = _pct(sum(accs) / len(accs)) if len(accs) == len(ratios) else "-"
        lines.append(f"| {_method_label(results, method)} | " + " | ".join(cells) + f" | {avg} |")
    quant = f", quantization {results['quant']}" if results.get("quant") else ""
    caption = (
        f"Accuracy (%) of `{results['model']}` on `{results['data']}` ({results['n']} items{quant}); "
        "ρ1 = fraction of Q/K/V parameters kept, ρ2 = fraction of the KV cache kept (measured on the "
        "compressed model); Avg. = mean over the ρ1 columns."
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


def format_perplexity_tables(results: dict[str, Any]) -> str:
    """Markdown of a perplexity grid: the FP16 perplexity, then two tables of the same cells.

    1. methods × ρ1 asked: perplexity, with KL, the measured ρ1 and ρ2 below; the decode layout per method.
    2. at equal ρ2: one row per cell, all methods together, sorted by ρ2 (largest cache first), so that
       methods whose caches are about the same size sit next to each other.
    """
    ratios, cells, fp16 = results["ratios"], results["cells"], results["fp16"]
    settings = results.get("settings", {})
    quant = f", quantization {results['quant']}" if results.get("quant") else ""
    caption = (
        f"Perplexity of `{results['model']}` on the evaluation part of `{results['data']}` ({results['n']} "
        f"windows of {settings.get('seq_len', '?')} tokens{quant}). **{_fp16_label(results)}: perplexity "
        f"{fp16['perplexity']:.2f}.** KL = mean per-token KL(FP16 ‖ cell) of the next-token distributions; "
        "ρ1 = fraction of Q/K/V parameters kept, ρ2 = fraction of the KV cache kept (both measured on the "
        "compressed model); layout = how the cached latent is split over the KV heads (per_head: one per "
        "head, shared: one per projection, joint: one for K and V)."
    )

    by_ratio = ["| Method | layout | " + " | ".join(f"ρ1 = {r:g}" for r in ratios) + " |"]
    by_ratio.append("|" + "---|" * (len(ratios) + 2))
    by_ratio.append(
        f"| {_fp16_label(results)} | dense | "
        + " | ".join(f"{fp16['perplexity']:.2f}" for _ in ratios)
        + " |"
    )
    ordered = []  # (method, cell) in the grid's order, for the second table
    for method in results["methods"]:
        row, layouts = [], []
        for r in ratios:
            cell = cells.get(cell_key(method, r))
            if cell is None:
                row.append("-")
                continue
            ordered.append((method, cell))
            if cell.get("layout") and cell["layout"] not in layouts:
                layouts.append(cell["layout"])
            row.append(
                f"{cell['perplexity']:.2f}<br><sub>KL {_num(cell.get('kl'), '.4f')} · "
                f"ρ1 {_num(cell.get('rho1'), '.2f')} · ρ2 {_num(cell.get('rho2'), '.2f')}</sub>"
            )
        label = _method_label(results, method)
        by_ratio.append(f"| {label} | {', '.join(layouts) or '-'} | " + " | ".join(row) + " |")

    by_rho2 = ["| ρ2 | Method | layout | ρ1 asked | ρ1 | perplexity | KL |", "|---|---|---|---|---|---|---|"]
    by_rho2.append(f"| 1.00 | {_fp16_label(results)} | dense | 1 | 1.00 | {fp16['perplexity']:.2f} | - |")
    # Stable sort: equal ρ2 keeps the grid's order (methods as listed, then ρ1 asked).
    for method, cell in sorted(ordered, key=lambda mc: -(mc[1].get("rho2") or 0.0)):
        by_rho2.append(
            f"| {_num(cell.get('rho2'), '.2f')} | {_method_label(results, method)} | {cell.get('layout') or '-'} "
            f"| {cell['ratio']:g} | {_num(cell.get('rho1'), '.2f')} | {cell['perplexity']:.2f} "
            f"| {_num(cell.get('kl'), '.4f')} |"
        )
    return (
        caption
        + "\n\n### By ρ1 (parameters kept)\n\n"
        + "\n".join(by_ratio)
        + "\n\n### At equal ρ2 (KV cache kept)\n\nThe same cells, sorted by ρ2.\n\n"
        + "\n".join(by_rho2)
        + "\n"
    )


def write_table(results: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, format_table(results))


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against ρ1 per method; or, for perplexity, perplexity (log scale) against ρ1 and against ρ2."""
    if results.get("kind") == PERPLEXITY:
        fig = _perplexity_figure(results)
    else:
        fig = _accuracy_figure(results)
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def _accuracy_figure(results: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    for method in results["methods"]:
        points = [
            (c["ratio"], 100 * c["accuracy"]) for k, c in results["cells"].items() if c["method"] == method
        ]
        points.sort()
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(100 * results["fp16"]["accuracy"], color="black", linestyle="--", linewidth=1, label="FP16")
    ax.set_xlabel("ρ1 (fraction of Q/K/V parameters kept)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['model']} on {results['data']} ({results['n']} items)")
    ax.invert_xaxis()  # compression grows to the right, as in the paper's tables
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def _perplexity_figure(results: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(11.0, 4.4), dpi=120)
    axes = fig.subplots(1, 2, sharey=True)
    fp16 = results["fp16"]["perplexity"]
    for ax, rho, what in (
        (axes[0], "rho1", "ρ1 (fraction of Q/K/V parameters kept)"),
        (axes[1], "rho2", "ρ2 (fraction of the KV cache kept)"),
    ):
        for method in results["methods"]:
            # A perplexity that overflowed (inf) has no place on a log axis.
            points = sorted(
                (c[rho], c["perplexity"])
                for c in results["cells"].values()
                if c["method"] == method and c.get(rho) is not None and math.isfinite(c["perplexity"])
            )
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        if math.isfinite(fp16):
            ax.axhline(fp16, color="black", linestyle="--", linewidth=1, label="FP16")
        ax.set_yscale("log")
        ax.set_xlabel(what)
        ax.invert_xaxis()  # compression grows to the right
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    axes[1].legend()
    fig.suptitle(
        f"{results['model']} on {results['data']} ({results['n']} windows of "
        f"{results.get('settings', {}).get('seq_len', '?')} tokens)"
    )
    return fig
