"""The ``lowrank`` command line."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lowrank_kit.cli.bench import bench_app
from lowrank_kit.cli.bench_speed import speed as _bench_speed  # noqa: F401  (registers `bench speed`)
from lowrank_kit.cli.common import RATIO_HELP, _Group, _parse_dtype, err_console, out, print_json
from lowrank_kit.cli.evaluate import eval_command
from lowrank_kit.cli.testbed import testbed_app

app = typer.Typer(
    cls=_Group,
    name="lowrank",
    help="Low-rank decomposition and quantization for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(cls=_Group, help="Inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def _build_recipe(
    recipe: Path | None,
    model: str | None,
    method: str | None,
    ratio: float | None,
    rank: int | None,
    quant: str | None,
    calib_samples: int | None,
    seed: int | None,
    granularity: int | None,
    rank_allocation: str | None,
    calib_source: str | None,
    calib_path: str | None,
):
    from lowrank_kit.recipe import DEFAULT_MODEL, RecipeError, load_recipe, recipe_from_flags

    if recipe is not None:
        step_flags = {
            "--method": method,
            "--ratio": ratio,
            "--rank": rank,
            "--quant": quant,
            "--calib-samples": calib_samples,
            "--seed": seed,
            "--granularity": granularity,
            "--rank-allocation": rank_allocation,
            "--calib-source": calib_source,
            "--calib-path": calib_path,
        }
        given = [k for k, v in step_flags.items() if v is not None]
        if given:
            raise RecipeError(
                f"--recipe cannot be combined with {', '.join(given)}; put them in the recipe file"
            )
        loaded = load_recipe(recipe)
        return loaded.model_copy(update={"model": model}) if model else loaded
    return recipe_from_flags(
        model=model or DEFAULT_MODEL,
        method=method,
        ratio=ratio,
        rank=rank,
        quant=quant,
        calib_samples=calib_samples,
        seed=seed,
        granularity=granularity,
        rank_allocation=rank_allocation,
        calib_source=calib_source,
        calib_path=calib_path,
    )


# Options shared by `compress` and `recipe show`.
O_RECIPE = typer.Option(None, "--recipe", help="Recipe file (YAML or JSON).", dir_okay=False)
O_MODEL = typer.Option(
    None, "--model", "-m", help="Alias (see `lowrank models`), hub id, local directory or `testbed`."
)
O_METHOD = typer.Option(None, "--method", help="Decomposer (see `lowrank methods`).")
O_RATIO = typer.Option(None, "--ratio", help=RATIO_HELP)
O_RANK = typer.Option(
    None, "--rank", help="Explicit rank per matrix (per head for per-head methods) instead of --ratio."
)
O_QUANT = typer.Option(
    None,
    "--quant",
    help="Quantization scheme: w8a8, w4a4, w8a4, w4a16, w8a16, then optionally -kv8/-kv4 (latent cache "
    "bits) and -qat (e.g. w8a8-kv8-qat); see docs/quantization.md.",
)
O_CALIB = typer.Option(None, "--calib-samples", help="Number of calibration samples (default 64).")
O_SEED = typer.Option(None, "--seed", help="Calibration seed (default 0).")
O_GRAN = typer.Option(
    None, "--granularity", help="Round ranks to multiples of this (8/16 suit the decode kernel)."
)
O_ALLOC = typer.Option(
    None, "--rank-allocation", help="uniform, importance or sensitivity (method-dependent)."
)
O_CSRC = typer.Option(None, "--calib-source", help="testbed, tsv or hf.")
O_CPATH = typer.Option(
    None, "--calib-path", help="TSV file or save_to_disk directory for --calib-source tsv/hf."
)


def _rank_summary(ranks: dict[str, dict[str, Any]]) -> dict[str, str]:
    per_target: dict[str, list[int]] = {}
    for entry in ranks.values():
        for target, spec in entry.items():
            vals = spec["ranks"] if spec["kind"] == "per_head" else [spec["rank"]]
            per_target.setdefault(target, []).extend(vals)
    return {
        t: f"{min(v)}/{statistics.mean(v):.1f}/{max(v)}"
        + (" (per head)" if any(ranks[k][t]["kind"] == "per_head" for k in ranks if t in ranks[k]) else "")
        for t, v in per_target.items()
    }


def _summary_table(report: dict[str, Any]) -> Table:
    table = Table(title="lowrank compress", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    table.add_row("model", str(report.get("model")))
    table.add_row("method", str(report.get("method") or "-"))
    table.add_row("quantization", str(report.get("quant") or "-"))
    table.add_row("parameters before → after", f"{report['params_before']:,} → {report['params_after']:,}")
    table.add_row("ρ1 (params kept in targets)", fmt(report.get("rho1")))
    table.add_row("ρ2 (KV cache kept)", fmt(report.get("rho2")))
    for target, summary in _rank_summary(report.get("ranks", {})).items():
        table.add_row(f"rank {target} (min/mean/max)", summary)
    for stage in report.get("stages", []):
        table.add_row(f"time: {stage['stage']}", f"{stage['seconds']:.2f} s")
    table.add_row("wall time", f"{report['seconds']:.2f} s")
    if report.get("disk_bytes") and report.get("original_weight_bytes"):
        table.add_row(
            "weights on disk (vs original)",
            f"{report['disk_bytes'] / 2**20:,.2f} MiB ({report['disk_bytes'] / report['original_weight_bytes']:.1%})",
        )
    cache = report.get("calibration_cache")
    if cache:
        table.add_row(
            "calibration cache", f"{len(cache['reused'])} reused, {len(cache['computed'])} computed"
        )
    if report.get("output"):
        table.add_row("output", str(report["output"]))
    return table


@app.command()
def compress(
    recipe: Path | None = O_RECIPE,
    model: str | None = O_MODEL,
    method: str | None = O_METHOD,
    ratio: float | None = O_RATIO,
    rank: int | None = O_RANK,
    quant: str | None = O_QUANT,
    calib_samples: int | None = O_CALIB,
    seed: int | None = O_SEED,
    granularity: int | None = O_GRAN,
    rank_allocation: str | None = O_ALLOC,
    calib_source: str | None = O_CSRC,
    calib_path: str | None = O_CPATH,
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output directory (default: ./<model>-<method>-<ratio>)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    device: str = typer.Option("cpu", "--device", help="Device to compress on (cpu, cuda, cuda:1)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow remote-code models (Molmo v1)."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Do not keep calibration products on disk (a rerun starts over)."
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Where calibration products are kept so that an interrupted run resumes "
        "(default: calibration/ under $LOWRANK_KIT_CACHE or ~/.cache/lowrank_kit).",
        file_okay=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Compress a model: decompose (--method/--ratio) and/or quantize (--quant), then save it."""
    from lowrank_kit.pipeline import compress_to_directory
    from lowrank_kit.progress import RichReporter

    r = _build_recipe(
        recipe,
        model,
        method,
        ratio,
        rank,
        quant,
        calib_samples,
        seed,
        granularity,
        rank_allocation,
        calib_source,
        calib_path,
    )
    if output is None:
        dec = r.decompose
        parts = [Path(r.model).name or "model"]
        if dec is not None:
            parts += [dec.method, str(dec.ratio if dec.ratio is not None else f"rank{dec.rank}")]
        parts += [q.scheme for q in r.quantize]
        output = Path("-".join(parts))
    torch_dtype = _parse_dtype(dtype)
    result = compress_to_directory(
        r,
        output,
        overwrite=overwrite,
        reporter=RichReporter(err_console),
        dtype=torch_dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
        use_cache=not no_cache,
    )
    report = result.report
    if as_json:
        print_json(
            {
                "method": report["method"],
                "quant": report["quant"],
                "rho1": report["rho1"],
                "rho2": report["rho2"],
                "output": report["output"],
                "seconds": report["seconds"],
                "params_before": report["params_before"],
                "params_after": report["params_after"],
                "disk_bytes": report.get("disk_bytes"),
                "original_weight_bytes": report.get("original_weight_bytes"),
                "cache_ratio_vs_fp16": report.get("quantize", {}).get("cache_ratio_vs_fp16", report["rho2"]),
                "report": str(Path(report["output"]) / "lowrank_report.json"),
            }
        )
    else:
        out.print(_summary_table(report))


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the registered decomposers and quantizers."""
    from lowrank_kit.registry import get_registry

    reg = get_registry()
    if as_json:
        print_json({"decomposers": reg.names("decomposer"), "quantizers": reg.names("quantizer")})
        return
    table = Table(title="methods")
    for col in ("kind", "name", "summary", "plugin"):
        table.add_column(col)
    for kind in ("decomposer", "quantizer"):
        for name in reg.names(kind):
            table.add_row(kind, name, reg.get(kind, name).summary, reg.source_of(kind, name))
    out.print(table)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List supported model aliases and families."""
    from lowrank_kit.models.loading import list_models

    rows = list_models()
    if as_json:
        print_json(rows)
        return
    table = Table(title="models")
    for col in ("name", "family", "hub_id"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["family"], str(row.get("hub_id") or "-"))
    out.print(table)


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List loaded plugins, where each came from and what it registered."""
    from lowrank_kit.registry import get_registry

    infos = [p.as_dict() for p in get_registry().plugins.values()]
    if as_json:
        print_json(infos)
        return
    table = Table(title="plugins")
    for col in ("plugin", "source", "registered"):
        table.add_column(col)
    for p in infos:
        reg = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["registered"].items() if v) or "-"
        table.add_row(p["name"], p["source"], reg)
    out.print(table)


@recipe_app.command("show")
def recipe_show(
    recipe: Path | None = O_RECIPE,
    model: str | None = O_MODEL,
    method: str | None = O_METHOD,
    ratio: float | None = O_RATIO,
    rank: int | None = O_RANK,
    quant: str | None = O_QUANT,
    calib_samples: int | None = O_CALIB,
    seed: int | None = O_SEED,
    granularity: int | None = O_GRAN,
    rank_allocation: str | None = O_ALLOC,
    calib_source: str | None = O_CSRC,
    calib_path: str | None = O_CPATH,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the resolved recipe (every method parameter filled in) that flags or a file describe."""
    from lowrank_kit.recipe import resolve_recipe

    r = resolve_recipe(
        _build_recipe(
            recipe,
            model,
            method,
            ratio,
            rank,
            quant,
            calib_samples,
            seed,
            granularity,
            rank_allocation,
            calib_source,
            calib_path,
        )
    )
    if as_json:
        print_json(r.to_dict())
    else:
        typer.echo(r.to_yaml(), nl=False)


# Command groups defined in their own modules, added to `lowrank`.
app.command("eval")(eval_command)
app.add_typer(bench_app, name="bench")
app.add_typer(testbed_app, name="testbed")


def main() -> None:
    app(prog_name="lowrank")
