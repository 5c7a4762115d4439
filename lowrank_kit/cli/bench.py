"""``lowrank bench``: head-to-head benchmarks. ``accuracy`` is defined here; ``speed`` registers itself on
``bench_app`` from :mod:`lowrank_kit.cli.bench_speed`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lowrank_kit.cli.common import RATIO_HELP, _Group, _parse_dtype, err_console, out, print_json
from lowrank_kit.cli.evaluate import O_DEVICE, O_DTYPE, O_SEQ_LEN, O_SPLIT, O_STYLE, O_TOKENS, eval_cache

bench_app = typer.Typer(
    cls=_Group, help="Head-to-head benchmarks: accuracy grids, decode speed.", no_args_is_help=True
)


@bench_app.command("accuracy")
def accuracy(
    model: str | None = typer.Argument(
        None,
        metavar="MODEL",
        show_default=False,
        help="Alias, hub id, local directory or `testbed` (the model to compress; default testbed).",
    ),
    model_option: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="MODEL as an option: an alias, hub id, local directory or `testbed` (the default).",
        show_default=False,
    ),
    methods: str = typer.Option(
        "svd,asvd,svdllm,qsvd,wsvd",
        "--methods",
        help="Comma-separated decomposers (built-in or from plugins; see `lowrank methods`); "
        "name:key=value[:key=value] sets a method's parameters, e.g. wsvd:finetune=true.",
    ),
    ratios: str = typer.Option(
        "0.9,0.8,0.7,0.6,0.5", "--ratios", help=f"Comma-separated ρ1 values. {RATIO_HELP}"
    ),
    quant: str | None = typer.Option(
        None, "--quant", help="Also quantize every cell with this scheme (w8a8, w4a4, w8a4, ...)."
    ),
    data: str = typer.Option(
        "testbed",
        "--data",
        "-d",
        help="Evaluation data, as for `lowrank eval --data`: multiple-choice VQA scores accuracy; a text "
        "corpus (text:pydoc, text:PATH, or hf:DATASET[:CONFIG] for a text-only model) scores perplexity "
        "and KL on its evaluation part.",
    ),
    split: str | None = O_SPLIT,
    limit: int | None = typer.Option(
        None, "--limit", "-n", help="Evaluate only the first N items (windows, on a text corpus)."
    ),
    batch_size: int = typer.Option(
        16, "--batch-size", "-b", help="Items (windows, on a text corpus) per evaluation batch."
    ),
    max_new_tokens: int = O_TOKENS,
    prompt_style: str = O_STYLE,
    seq_len: int = O_SEQ_LEN,
    calib_source: str | None = typer.Option(
        None,
        "--calib-source",
        help="auto (default: real data for the model), testbed, tsv, hf (image questions) or text.",
    ),
    calib_path: str | None = typer.Option(
        None, "--calib-path", help="TSV file or save_to_disk directory for --calib-source tsv/hf."
    ),
    calib_dataset: str | None = typer.Option(
        None,
        "--calib-dataset",
        help="Calibration dataset: a hub id of ScienceQA-style image questions, or a text corpus: "
        "text:pydoc, text:PATH, hf:DATASET[:CONFIG] (its calibration part).",
    ),
    calib_config: str | None = typer.Option(
        None, "--calib-config", help="Config (subset) of the --calib-dataset hub dataset."
    ),
    calib_split: str | None = typer.Option(
        None, "--calib-split", help="Split of the calibration dataset (default train)."
    ),
    calib_samples: int | None = typer.Option(
        None, "--calib-samples", help="Calibration samples (default 64)."
    ),
    calib_max_length: int | None = typer.Option(
        None, "--calib-max-length", help="Tokens per calibration sample (a text window; default 2048)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Calibration seed (default 0)."),
    device: str = O_DEVICE,
    dtype: str | None = O_DTYPE,
    output: Path = typer.Option(
        Path("bench-accuracy"),
        "--output",
        "-o",
        help="Directory for results.json, table.md and the plot (accuracy_vs_rho1.png, or "
        "perplexity_vs_rho.png on a text corpus); a rerun resumes from it.",
        file_okay=False,
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Keep neither per-item evaluation results nor calibration products on disk."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"kind", "fp16": {...}, "rows": [...], ...} as JSON.'
    ),
) -> None:
    """Compress with every method at every ratio and score each cell (resumable), with tables and plot:
    accuracy on multiple-choice VQA, perplexity and KL on a text corpus."""
    from lowrank_kit.calib_cache import default_cache_dir
    from lowrank_kit.eval.grid import PERPLEXITY, GridSpec, plot_file, rows, run_accuracy_grid
    from lowrank_kit.progress import RichReporter
    from lowrank_kit.recipe import RHO1_MEANING, RecipeError, parse_fractions, parse_list

    if model is not None and model_option is not None and model != model_option:
        raise RecipeError(f"give the model once, as MODEL or --model; got {model!r} and {model_option!r}")
    model = model or model_option or "testbed"
    spec = GridSpec(
        model=model,
        methods=parse_list(methods, "--methods"),
        ratios=parse_fractions(ratios, "--ratios", RHO1_MEANING),
        quant=quant,
        data=data,
        split=split,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_style=prompt_style,
        seq_len=seq_len,
        device=device,
        dtype=_parse_dtype(dtype),
        calib_samples=calib_samples,
        seed=seed,
        calib_source=calib_source,
        calib_path=calib_path,
        calib_dataset=calib_dataset,
        calib_config=calib_config,
        calib_split=calib_split,
        calib_max_length=calib_max_length,
    )
    results = run_accuracy_grid(
        spec,
        output,
        reporter=RichReporter(err_console),
        eval_cache=eval_cache(no_cache, None),
        calib_cache_dir=None if no_cache else default_cache_dir(),
    )
    fp16 = {k: v for k, v in results["fp16"].items() if k not in ("items", "fingerprint")}
    cells = rows(results)
    if as_json:
        print_json(
            {
                "kind": results["kind"],
                "fp16": fp16,
                "rows": cells,
                "output": str(output),
                "seconds": results["seconds"],
            }
        )
        return
    if results["kind"] == PERPLEXITY:
        table = _perplexity_table(results, fp16, cells)
    else:
        table = _accuracy_table(results, fp16, cells)
    out.print(table)
    out.print(
        f"results: {output / 'results.json'}, table: {output / 'table.md'}, plot: {output / plot_file(results)}"
    )


def _fmt(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _accuracy_table(results: dict[str, Any], fp16: dict[str, Any], cells: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"lowrank bench accuracy: {results['model']} on {results['data']} ({results['n']} items)"
    )
    for col in ("method", "ρ1 asked", "ρ1", "ρ2", "accuracy", "NLL", "KL vs FP16", "time"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row(
        "FP16 (uncompressed)", "1", "1", "1", f"{100 * fp16['accuracy']:.1f}%", f"{fp16['nll']:.4f}", "-", "-"
    )
    for row in cells:
        table.add_row(
            row["method"],
            f"{row['ratio']:g}",
            _fmt(row.get("rho1"), ".3f"),
            _fmt(row.get("rho2"), ".3f"),
            f"{100 * row['accuracy']:.1f}%",
            f"{row['nll']:.4f}",
            _fmt(row.get("kl"), ".5f"),
            f"{row['compress_seconds'] + row['eval_seconds']:.1f} s",
        )
    return table


def _perplexity_table(results: dict[str, Any], fp16: dict[str, Any], cells: list[dict[str, Any]]) -> Table:
    table = Table(
        title=f"lowrank bench accuracy: {results['model']} on {results['data']} (evaluation part, "
        f"{results['n']} windows of {results['settings']['seq_len']} tokens)"
    )
    for col in ("method", "ρ1 asked", "ρ1", "ρ2", "layout", "perplexity", "KL vs FP16", "time"):
        table.add_column(col, justify="left" if col in ("method", "layout") else "right")
    table.add_row("FP16 (uncompressed)", "1", "1", "1", "dense", f"{fp16['perplexity']:.3f}", "-", "-")
    for row in cells:
        table.add_row(
            row["method"],
            f"{row['ratio']:g}",
            _fmt(row.get("rho1"), ".3f"),
            _fmt(row.get("rho2"), ".3f"),
            row.get("layout") or "-",
            f"{row['perplexity']:.3f}",
            _fmt(row.get("kl"), ".5f"),
            f"{row['compress_seconds'] + row['eval_seconds']:.1f} s",
        )
    return table
