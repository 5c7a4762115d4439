"""Head-to-head accuracy: compress one model with several methods at several ratios, evaluate each cell.

:func:`run_accuracy_grid` loads the model once, evaluates it uncompressed (the FP16 row, which is also
the reference for the KL column), builds the calibration set once (every cell uses the same default
calibration recipe, so every method sees the same samples), and then for each method × ratio
compresses a fresh copy in memory (:func:`lowrank_kit.pipeline.compress`) and evaluates it on the same
items with the same prompts.

Resuming: the results JSON is rewritten atomically after every cell. Each cell stores a fingerprint of
what it depends on (model content, data, method, ratio, quantization, calibration and evaluation
settings, lowrank_kit's version); a rerun with the same output directory keeps the cells whose
fingerprint matches and recomputes the others. The markdown table (shaped like Table 1 of the WSVD
paper: methods × ρ1 with an average column and the FP16 row, ρ2 under each accuracy) and the plot
(accuracy against ρ1 per method) are written from the JSON at the end.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_kit.errors import RecipeError, unknown_name
from lowrank_kit.eval.cache import EvalCache, item_digest
from lowrank_kit.eval.datasets import load_eval_data
from lowrank_kit.eval.engine import EvalResult, ItemResult, evaluate
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

RESULTS_VERSION = 1
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_rho1.png"
DEFAULT_METHODS = ("svd", "asvd", "svdllm", "qsvd", "wsvd")
DEFAULT_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass
class GridSpec:
    """What ``lowrank bench accuracy`` runs."""

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
    extra: dict[str, Any] = field(default_factory=dict)


def parse_list(text: str, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise RecipeError(f"--{what} needs a comma-separated list, got {text!r}")
    if len(set(values)) != len(values):
        raise RecipeError(f"--{what} lists a value twice: {text!r}")
    return values


def parse_ratios(text: str) -> list[float]:
    out = []
    for value in parse_list(text, "ratios"):
        try:
            ratio = float(value)
        except ValueError:
            raise RecipeError(
                f"--ratios: {value!r} is not a number; give fractions kept, e.g. 0.9,0.7,0.5"
            ) from None
        if not 0 < ratio <= 1:
            raise RecipeError(f"--ratios: {ratio} is outside (0, 1]; ρ1 is the fraction of parameters kept")
        out.append(ratio)
    return out


def parse_method(label: str) -> tuple[str, dict[str, Any]]:
    """A grid row's method: ``name`` or ``name:key=value[:key=value...]`` (e.g. ``wsvd:finetune=false``).

    Values are read as YAML scalars (``false``, ``10``, ``1e-4``, ``eigen``); the parameters are
    checked against the method's config class when its recipes are resolved.
    """
    import yaml

    name, *pairs = label.split(":")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise RecipeError(
                f"--methods: {label!r}: {pair!r} is not key=value; write a method with parameters as "
                "name:key=value[:key=value], e.g. wsvd:finetune=false"
            )
        if key.strip() in params:
            raise RecipeError(f"--methods: {label!r} sets {key.strip()!r} twice")
        try:
            params[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            params[key.strip()] = value.strip()
    return name.strip(), params


def check_methods(methods: Sequence[str]) -> None:
    from lowrank_kit.registry import get_registry

    names = get_registry().names("decomposer")
    for m in methods:
        name, _ = parse_method(m)
        if name not in names:
            raise unknown_name("method", name, names)


# -- results file ----------------------------------------------------------------------------------
def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cell_key(method: str, ratio: float) -> str:
    return f"{method}@{ratio:g}"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("results file %s is unreadable (%s); starting the grid over", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != RESULTS_VERSION:
        log.warning("results file %s is from another format version; starting the grid over", path)
        return {}
    return data


def _summary(result: EvalResult) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("settings", None)
    return data


def _fp16_reference(entry: dict[str, Any]) -> EvalResult:
    return EvalResult(items=[ItemResult(**row) for row in entry["items"]])


# -- the grid --------------------------------------------------------------------------------------
def run_accuracy_grid(
    spec: GridSpec,
    output: str | Path,
    *,
    reporter: Reporter = NULL_REPORTER,
    eval_cache: EvalCache | None = None,
    calib_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the grid into ``output``; returns the results (also in ``output/results.json``)."""
    import lowrank_kit
    from lowrank_kit.calib_cache import model_digest
    from lowrank_kit.data.sources import build_calibration
    from lowrank_kit.models.loading import load_model
    from lowrank_kit.pipeline import compress, needs_calibration
    from lowrank_kit.recipe import recipe_from_flags, resolve_recipe

    t0 = time.perf_counter()
    output = Path(output)
    methods = list(spec.methods)
    ratios = [float(r) for r in spec.ratios]
    check_methods(methods)
    recipes = {}
    for method in methods:
        name, params = parse_method(method)
        for ratio in ratios:
            recipes[cell_key(method, ratio)] = resolve_recipe(
                recipe_from_flags(
                    model=spec.model,
                    method=name,
                    params=params,
                    ratio=ratio,
                    quant=spec.quant,
                    calib_samples=spec.calib_samples,
                    seed=spec.seed,
                )
            )
    data = load_eval_data(spec.data, limit=spec.limit, split=spec.split)
    loaded = load_model(spec.model, dtype=spec.dtype, device=spec.device, reporter=reporter)
    eval_settings = {
        "batch_size": spec.batch_size,
        "max_new_tokens": spec.max_new_tokens,
        "prompt_style": spec.prompt_style,
    }
    common = {
        "lowrank_kit": lowrank_kit.__version__,
        "model": model_digest(loaded.model),
        "data": _digest([spec.data, [item_digest(it) for it in data.items]]),
        "eval": eval_settings,
        "device": torch.device(spec.device).type,
        "dtype": str(next(loaded.model.parameters()).dtype),
    }
    results_path = output / RESULTS_FILE
    previous = load_results(results_path)
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "model": spec.model,
        "data": spec.data,
        "n": len(data.items),
        "quant": spec.quant,
        "methods": methods,
        "ratios": ratios,
        "settings": {**eval_settings, "limit": spec.limit, "device": spec.device, "dtype": common["dtype"]},
        "fp16": None,
        "cells": {},
    }
    for key, cell in (previous.get("cells") or {}).items():
        results["cells"][key] = cell  # kept only if its fingerprint still matches (checked below)

    def save() -> None:
        write_json_atomic(results_path, results)

    def run_eval(model, name, reference=None) -> EvalResult:
        return evaluate(
            model,
            loaded.processor,
            loaded.adapter,
            data.items,
            batch_size=spec.batch_size,
            max_new_tokens=spec.max_new_tokens,
            prompt_style=spec.prompt_style,
            reference=reference,
            reporter=reporter,
            cache=eval_cache,
            description=f"evaluate {name}",
        )

    keys = list(recipes)
    with reporter.stage("accuracy grid", total=len(keys) + 1) as grid:
        fp16_fingerprint = _digest({**common, "cell": "fp16"})
        old = previous.get("fp16")
        if old and old.get("fingerprint") == fp16_fingerprint:
            results["fp16"] = old
            reference = _fp16_reference(old)
        else:
            reference = run_eval(loaded.model, "uncompressed")
            results["fp16"] = {
                "fingerprint": fp16_fingerprint,
                **_summary(reference),
                "items": [r.to_dict() for r in reference.items],
            }
            save()
        grid.advance()

        calibration = None
        for key in keys:
            recipe = recipes[key]
            fingerprint = _digest({**common, "recipe": recipe.to_dict(), "cell": key})
            old = results["cells"].get(key)
            if old and old.get("fingerprint") == fingerprint:
                log.info("%s: reusing the finished cell from %s", key, results_path)
                grid.advance()
                continue
            if calibration is None and needs_calibration(recipe):
                calibration = build_calibration(
                    recipe.calibration, loaded.processor, loaded.adapter, reporter=reporter
                )
            model = copy.deepcopy(loaded.model)
            t_cell = time.perf_counter()
            compressed = compress(
                model,
                recipe,
                adapter=loaded.adapter,
                processor=loaded.processor,
                calibration=calibration if needs_calibration(recipe) else None,
                reporter=reporter,
                device=spec.device,
                cache_dir=calib_cache_dir,
            )
            compress_seconds = time.perf_counter() - t_cell
            method, ratio = key.split("@")
            result = run_eval(model, key, reference=reference)
            report = compressed.report
            results["cells"][key] = {
                "fingerprint": fingerprint,
                "method": method,
                "ratio": float(ratio),
                "rho1": report.get("rho1"),
                "rho2": report.get("rho2"),
                "quant": report.get("quant"),
                "compress_seconds": round(compress_seconds, 3),
                "eval_seconds": round(result.seconds, 3),
                **_summary(result),
            }
            del model, compressed
            save()
            grid.advance()

    # Cells of an earlier grid that this one does not ask for stay out of the table.
    results["cells"] = {k: results["cells"][k] for k in keys}
    results["seconds"] = round(time.perf_counter() - t0, 3)
    save()
    write_table(results, output / TABLE_FILE)
    write_plot(results, output / PLOT_FILE)
    return results


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells as rows for ``--json`` (method, ratio, accuracy, nll, kl, rho1, rho2, ...)."""
    out = []
    for key in results["cells"]:
        cell = results["cells"][key]
        out.append({k: v for k, v in cell.items() if k != "fingerprint"})
    return out


# -- table and plot --------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: methods × ρ1 (accuracy %, ρ2 below), an Avg. column and the FP16 row."""
    ratios = results["ratios"]
    fp16 = results["fp16"]
    header = "| Method | " + " | ".join(f"ρ1 = {r:g}" for r in ratios) + " | Avg. |"
    lines = [header, "|" + "---|" * (len(ratios) + 2)]
    dtype = results.get("settings", {}).get("dtype", "").replace("torch.", "")
    label = f"FP16 (uncompressed, {dtype})" if dtype else "FP16 (uncompressed)"
    fp16_acc = _pct(fp16["accuracy"])
    lines.append(f"| {label} | " + " | ".join(fp16_acc for _ in ratios) + f" | {fp16_acc} |")
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
        label = method if not results.get("quant") else f"{method} + {results['quant']}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    quant = f", quantization {results['quant']}" if results.get("quant") else ""
    caption = (
        f"Accuracy (%) of `{results['model']}` on `{results['data']}` ({results['n']} items{quant}); "
        "ρ1 = fraction of Q/K/V parameters kept, ρ2 = fraction of the KV cache kept (measured on the "
        "compressed model); Avg. = mean over the ρ1 columns."
    )
    return caption + "\n\n" + "\n".join(lines) + "\n"


def write_table(results: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(format_table(results))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

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
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
