"""Accuracy of low-rank + low-precision models: the table of docs/quantization.md.

Rows (``--rows`` picks a subset by key): FP16; every decomposer at ρ1 = 0.5 unquantized; wsvd at 0.5
with w8a8, with w8a8 + qat and with w8a8-kv8 + qat (8-bit latents: the paper's headline setting); the
baselines asvd, svdllm and qsvd at 0.5 with w8a4 (the paper's Table 2 comparison); hadamard + rtn alone
at w4a4. Each row is compressed from the same loaded model in memory, with the same calibration
samples, and evaluated on the same items (:func:`lowrank_kit.eval.engine.evaluate`; KL against the
FP16 row). The JSON gets accuracy, NLL, KL, ρ1, ρ2, the cache size relative to FP16 (latent elements ×
latent bits / (K+V elements × 16), and with the int scales), the weights' bytes and the times. The
JSON is rewritten after every row, and a rerun with the same ``--output`` keeps the rows whose
settings are unchanged.

    python benchmarks/quant_accuracy.py --model testbed --data testbed --device cuda \\
        --output benchmarks/results/quant_accuracy_testbed.json --table docs/quant_accuracy_table.md
    python benchmarks/quant_accuracy.py --model out/tiny --data items.tsv --calib-source tsv \\
        --calib-path items.tsv --calib-samples 4 --limit 4      # a smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowrank_kit.progress import Reporter, Stage

RATIO = 0.5
# key → (decomposer or None, ρ1 or None, scheme or None, quantizer methods overriding the scheme's)
ROWS: dict[str, tuple[str | None, float | None, str | None, list[str] | None]] = {
    "fp16": (None, None, None, None),
    **{f"{m}@{RATIO}": (m, RATIO, None, None) for m in ("svd", "asvd", "svdllm", "qsvd", "wsvd")},
    f"wsvd@{RATIO}+w8a8": ("wsvd", RATIO, "w8a8", None),
    f"wsvd@{RATIO}+w8a8-qat": ("wsvd", RATIO, "w8a8-qat", None),
    f"wsvd@{RATIO}+w8a8-kv8-qat": ("wsvd", RATIO, "w8a8-kv8-qat", None),
    **{f"{m}@{RATIO}+w8a4": (m, RATIO, "w8a4", None) for m in ("asvd", "svdllm", "qsvd")},
    "hadamard+rtn w4a4": (None, None, "w4a4", None),
}


class PrintReporter(Reporter):
    def _finish(self, stage: Stage) -> None:
        print(f"  {stage.name}: {time.perf_counter() - stage.started:.1f} s", file=sys.stderr, flush=True)


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def recipe_for(key: str, args):
    from lowrank_kit.recipe import parse_recipe, recipe_from_flags, resolve_recipe

    method, ratio, scheme, methods = ROWS[key]
    if method is None and scheme is None:
        return None
    recipe = recipe_from_flags(
        model=args.model,
        method=method,
        ratio=ratio,
        quant=scheme,
        calib_samples=args.calib_samples,
        seed=args.seed,
        calib_source=args.calib_source,
        calib_path=args.calib_path,
    )
    if methods is not None:
        data = recipe.to_dict()
        data["steps"][-1]["methods"] = methods
        recipe = parse_recipe(data)
    return resolve_recipe(recipe)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"Model `{results['model']}` on `{results['data']}` ({results['n']} items, {results['settings']['dtype']}, "
        f"{results['settings']['device']}); KL against the FP16 row.",
        "",
        "| row | ρ1 | ρ2 | cache vs FP16 | (with scales) | accuracy (%) | NLL | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results["rows"].items():

        def num(name, fmt="{:.3f}", row=row):
            value = row.get(name)
            return "-" if value is None else fmt.format(value)

        lines.append(
            f"| {key} | {num('rho1')} | {num('rho2')} | {num('cache_ratio_vs_fp16')} | "
            f"{num('cache_ratio_vs_fp16_with_scales')} | {_pct(row.get('accuracy'))} | {num('nll')} | {num('kl', '{:.4f}')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--data", default="testbed")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, help="float32, float16 or bfloat16 (default: the checkpoint's)"
    )
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-source", default=None)
    parser.add_argument("--calib-path", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys: " + ", ".join(ROWS))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/quant_accuracy.json"))
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)

    import lowrank_kit
    from lowrank_kit.calib_cache import model_digest
    from lowrank_kit.data.sources import build_calibration
    from lowrank_kit.eval.cache import item_digest
    from lowrank_kit.eval.datasets import load_eval_data
    from lowrank_kit.eval.engine import evaluate
    from lowrank_kit.models.loading import load_model
    from lowrank_kit.pipeline import compress, needs_calibration

    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; available: {', '.join(ROWS)}")
    dtype = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype
    ]
    reporter = PrintReporter()
    recipes = {k: recipe_for(k, args) for k in keys}
    data = load_eval_data(args.data, limit=args.limit)
    loaded = load_model(args.model, dtype=dtype, device=args.device, reporter=reporter)
    settings = {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "device": args.device,
        "dtype": str(next(loaded.model.parameters()).dtype),
    }
    common = {
        "lowrank_kit": lowrank_kit.__version__,
        "model": model_digest(loaded.model),
        "data": _digest([args.data, [item_digest(it) for it in data.items]]),
        "settings": settings,
    }
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    results: dict[str, Any] = {
        "benchmark": "quant_accuracy",
        "model": args.model,
        "data": args.data,
        "n": len(data.items),
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(0)
            if args.device.startswith("cuda")
            else platform.processor(),
        },
        "rows": {},
    }

    def run_eval(model, name, reference=None):
        return evaluate(
            model,
            loaded.processor,
            loaded.adapter,
            data.items,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            reference=reference,
            reporter=reporter,
            description=f"evaluate {name}",
        )

    reference = None
    calibration = None
    for key in ["fp16", *[k for k in keys if k != "fp16"]]:
        recipe = recipes.get(key)
        fingerprint = _digest({**common, "row": key, "recipe": None if recipe is None else recipe.to_dict()})
        old = (previous.get("rows") or {}).get(key)
        if key != "fp16" and old and old.get("fingerprint") == fingerprint and key in keys:
            results["rows"][key] = old
            print(f"{key}: reused from {args.output}", file=sys.stderr)
            continue
        print(f"{key} ...", file=sys.stderr, flush=True)
        if recipe is None:
            if reference is None:
                reference = run_eval(loaded.model, "FP16")
            if key in keys:
                results["rows"][key] = {
                    "fingerprint": fingerprint,
                    "rho1": None,
                    "rho2": 1.0,
                    "cache_ratio_vs_fp16": 1.0,
                    "cache_ratio_vs_fp16_with_scales": 1.0,
                    "accuracy": reference.accuracy,
                    "nll": reference.nll,
                    "kl": 0.0,
                    "eval_seconds": round(reference.seconds, 3),
                }
            continue
        if calibration is None and needs_calibration(recipe):
            calibration = build_calibration(
                recipe.calibration, loaded.processor, loaded.adapter, reporter=reporter
            )
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        result = compress(
            model,
            recipe,
            adapter=loaded.adapter,
            processor=loaded.processor,
            calibration=calibration if needs_calibration(recipe) else None,
            reporter=reporter,
            device=args.device,
        )
        seconds = time.perf_counter() - t0
        scores = run_eval(model, key, reference=reference)
        report = result.report
        quant = report.get("quantize") or {}
        results["rows"][key] = {
            "fingerprint": fingerprint,
            "method": report.get("method"),
            "quant": report.get("quant"),
            "quant_methods": quant.get("methods"),
            "rho1": report.get("rho1"),
            "rho2": report.get("rho2"),
            "cache_ratio_vs_fp16": quant.get("cache_ratio_vs_fp16", report.get("rho2")),
            "cache_ratio_vs_fp16_with_scales": quant.get(
                "cache_ratio_vs_fp16_with_scales", report.get("rho2")
            ),
            "weight_bytes": report.get("weight_bytes"),
            "original_weight_bytes": report.get("original_weight_bytes"),
            "accuracy": scores.accuracy,
            "nll": scores.nll,
            "kl": scores.kl,
            "compress_seconds": round(seconds, 3),
            "eval_seconds": round(scores.seconds, 3),
            "qat": quant.get("qat") and {k: quant["qat"][k] for k in ("mean_loss_before", "mean_loss_after")},
        }
        del model, result
        _write_json(args.output, results)
    results["rows"] = {k: results["rows"][k] for k in keys}
    _write_json(args.output, results)
    table = format_table(results)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
