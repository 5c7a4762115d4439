"""Accuracy of low-rank + low-precision models: the table of docs/quantization.md.

Rows (``--rows`` picks a subset by key): FP16; every decomposer at ρ1 = 0.5 unquantized; wsvd at 0.5
with w8a8, with w8a8 + qat and with w8a8-kv8 + qat (8-bit latents: the paper's headline setting); the
baselines asvd, svdllm and qsvd at 0.5 with w8a4 (the paper's Table 2 comparison); hadamard + rtn alone
at w4a4. The rows are recipes run by :func:`lowrank_kit.eval.grid.run_grid`: each is compressed from the
same loaded model in memory, with the same calibration samples, and evaluated on the same items (KL
against the FP16 row). The JSON gets accuracy, NLL, KL, ρ1, ρ2, the cache size relative to FP16 (latent
elements × latent bits / (K+V elements × 16), and with the int scales), the weights' bytes and the times.
The JSON is rewritten after every row, and a rerun with the same ``--output`` keeps the rows whose
settings are unchanged.

    python benchmarks/quant_accuracy.py --model testbed --data testbed --device cuda \\
        --output benchmarks/results/quant_accuracy_testbed.json --table docs/quant_accuracy_table.md
    python benchmarks/quant_accuracy.py --model out/tiny --data items.tsv --calib-source tsv \\
        --calib-path items.tsv --calib-samples 4 --limit 4      # a smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowrank_kit.eval.grid import GridRow, GridSpec, ResultsFile, run_grid, write_text_atomic
from lowrank_kit.progress import Reporter, Stage

RATIO = 0.5
FP16 = "fp16"  # the uncompressed model: the reference every row is compared with
ROWS: dict[str, GridRow] = {
    **{f"{m}@{RATIO}": GridRow(m, RATIO) for m in ("svd", "asvd", "svdllm", "qsvd", "wsvd")},
    f"wsvd@{RATIO}+w8a8": GridRow("wsvd", RATIO, "w8a8"),
    f"wsvd@{RATIO}+w8a8-qat": GridRow("wsvd", RATIO, "w8a8-qat"),
    f"wsvd@{RATIO}+w8a8-kv8-qat": GridRow("wsvd", RATIO, "w8a8-kv8-qat"),
    **{f"{m}@{RATIO}+w8a4": GridRow(m, RATIO, "w8a4") for m in ("asvd", "svdllm", "qsvd")},
    "hadamard+rtn w4a4": GridRow(quant="w4a4"),
}
KEYS = (FP16, *ROWS)
# A row of the JSON: these fields of the grid's cell, in this order.
ROW_FIELDS = (
    "fingerprint", "method", "quant", "quant_methods", "rho1", "rho2", "cache_ratio_vs_fp16",
    "cache_ratio_vs_fp16_with_scales", "weight_bytes", "original_weight_bytes", "accuracy", "nll", "kl",
    "compress_seconds", "eval_seconds", "qat",
)  # fmt: skip
SETTINGS = ("batch_size", "max_new_tokens", "limit", "device", "dtype")


class PrintReporter(Reporter):
    def _finish(self, stage: Stage) -> None:
        print(f"  {stage.name}: {time.perf_counter() - stage.started:.1f} s", file=sys.stderr, flush=True)


class QuantRowsFile(ResultsFile):
    """The benchmark's JSON: one entry per row key (FP16 among them), with the machine it ran on."""

    def __init__(self, path: Path, keys: list[str], device: str) -> None:
        super().__init__(path)
        self.keys = keys
        self.machine = {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(0)
            if device.startswith("cuda")
            else platform.processor(),
        }

    def encode(self, results: dict[str, Any]) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for key in self.keys:
            if key == FP16 and results["fp16"] is not None:
                fp16 = results["fp16"]
                rows[key] = {
                    "fingerprint": fp16["fingerprint"],
                    "rho1": None,
                    "rho2": 1.0,
                    "cache_ratio_vs_fp16": 1.0,
                    "cache_ratio_vs_fp16_with_scales": 1.0,
                    "accuracy": fp16["accuracy"],
                    "nll": fp16["nll"],
                    "kl": 0.0,
                    "eval_seconds": fp16["seconds"],
                }
            elif key in results["cells"]:
                rows[key] = {name: results["cells"][key].get(name) for name in ROW_FIELDS}
        return {
            "benchmark": "quant_accuracy",
            "model": results["model"],
            "data": results["data"],
            "n": results["n"],
            "settings": {name: results["settings"][name] for name in SETTINGS},
            "machine": self.machine,
            "rows": rows,
        }

    def decode(self, data: dict[str, Any]) -> dict[str, Any]:
        # The FP16 row keeps no per-item results, so the reference is evaluated again on every run.
        return {"cells": {k: row for k, row in (data.get("rows") or {}).items() if k != FP16}}


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
    parser.add_argument("--rows", default=",".join(KEYS), help="comma-separated row keys: " + ", ".join(KEYS))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/quant_accuracy.json"))
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)

    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        parser.error(f"unknown rows {unknown}; available: {', '.join(KEYS)}")
    dtype = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype
    ]
    spec = GridSpec(
        model=args.model,
        data=args.data,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=dtype,
        calib_samples=args.calib_samples,
        seed=args.seed,
        calib_source=args.calib_source,
        calib_path=args.calib_path,
    )
    results_file = QuantRowsFile(args.output, keys, args.device)
    grid = run_grid(spec, {k: ROWS[k] for k in keys if k != FP16}, results_file, reporter=PrintReporter())
    results = results_file.encode(grid)
    table = format_table(results)
    if args.table is not None:
        write_text_atomic(args.table, table)
    print(table)
    return results


if __name__ == "__main__":
    main()
