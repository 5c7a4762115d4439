"""``lowrank bench``: head-to-head benchmarks. ``accuracy`` is defined here; ``speed`` registers itself on
``bench_app`` from :mod:`lowrank_kit.cli.bench_speed`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lowrank_kit.cli.common import RATIO_HELP, _Group, _parse_dtype, err_console, out, print_json
from lowrank_kit.cli.evaluate import (
    O_DEVICE,
    O_DTYPE,
    O_LIMIT,
    O_SPLIT,
    O_STYLE,
    O_TOKENS,
    eval_cache,
)

bench_app = typer.Typer(
    cls=_Group, help="Head-to-head benchmarks: accuracy grids, decode speed.", no_args_is_help=True
)


@bench_app.command("accuracy")
def accuracy(
    model: str = typer.Option(
        "testbed",
        "--model",
        "-m",
        help="Alias, hub id, local directory or `testbed` (the model to compress).",
    ),
    methods: str = typer.Option(
        "svd,asvd,svdllm,qsvd,wsvd",
        "--methods",
        help="Comma-separated decomposers (built-in or from plugins; see `lowrank methods`); "
        "name:key=value[:key=value] sets a method's parameters, e.g. wsvd:finetune=false.",
    ),
    ratios: str = typer.Option(
        "0.9,0.8,0.7,0.6,0.5", "--ratios", help=f"Comma-separated ρ1 values. {RATIO_HELP}"
    ),
    quant: str | None = typer.Option(
        None, "--quant", help="Also quantize every cell with this scheme (w8a8, w4a4, w8a4, ...)."
    ),
    data: str = typer.Option(
        "testbed", "--data", "-d", help="Evaluation data, as for `lowrank eval --data`."
    ),
    split: str | None = O_SPLIT,
    limit: int | None = O_LIMIT,
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Items per evaluation batch."),
    max_new_tokens: int = O_TOKENS,
    prompt_style: str = O_STYLE,
    calib_samples: int | None = typer.Option(
        None, "--calib-samples", help="Calibration samples (default 64)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Calibration seed (default 0)."),
    device: str = O_DEVICE,
    dtype: str | None = O_DTYPE,
    output: Path = typer.Option(
        Path("bench-accuracy"),
        "--output",
        "-o",
        help="Directory for results.json, table.md and accuracy_vs_rho1.png; a rerun resumes from it.",
        file_okay=False,
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Keep neither per-item evaluation results nor calibration products on disk."
    ),
    as_json: bool = typer.Option(False, "--json", help='Print {"fp16": {...}, "rows": [...]} as JSON.'),
) -> None:
    """Compress with every method at every ratio and evaluate each cell (resumable), with table and plot."""
    from lowrank_kit.calib_cache import default_cache_dir
    from lowrank_kit.eval.grid import GridSpec, parse_list, parse_ratios, rows, run_accuracy_grid
    from lowrank_kit.progress import RichReporter

    spec = GridSpec(
        model=model,
        methods=parse_list(methods, "methods"),
        ratios=parse_ratios(ratios),
        quant=quant,
        data=data,
        split=split,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_style=prompt_style,
        device=device,
        dtype=_parse_dtype(dtype),
        calib_samples=calib_samples,
        seed=seed,
    )
    results = run_accuracy_grid(
        spec,
        output,
        reporter=RichReporter(err_console),
        eval_cache=eval_cache(no_cache, None),
        calib_cache_dir=None if no_cache else default_cache_dir(),
    )
    fp16 = {k: v for k, v in results["fp16"].items() if k not in ("items", "fingerprint")}
    if as_json:
        print_json(
            {"fp16": fp16, "rows": rows(results), "output": str(output), "seconds": results["seconds"]}
        )
        return
    table = Table(title=f"lowrank bench accuracy: {model} on {data} ({results['n']} items)")
    for col in ("method", "ρ1 asked", "ρ1", "ρ2", "accuracy", "NLL", "KL vs FP16", "time"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row(
        "FP16 (uncompressed)", "1", "1", "1", f"{100 * fp16['accuracy']:.1f}%", f"{fp16['nll']:.4f}", "-", "-"
    )
    for row in rows(results):
        table.add_row(
            row["method"],
            f"{row['ratio']:g}",
            "-" if row.get("rho1") is None else f"{row['rho1']:.3f}",
            "-" if row.get("rho2") is None else f"{row['rho2']:.3f}",
            f"{100 * row['accuracy']:.1f}%",
            f"{row['nll']:.4f}",
            "-" if row.get("kl") is None else f"{row['kl']:.5f}",
            f"{row['compress_seconds'] + row['eval_seconds']:.1f} s",
        )
    out.print(table)
    out.print(
        f"results: {output / 'results.json'}, table: {output / 'table.md'}, plot: {output / 'accuracy_vs_rho1.png'}"
    )
