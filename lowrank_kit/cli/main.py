"""The ``lowrank`` command line."""

from __future__ import annotations

import functools
import inspect
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

import lowrank_kit
from lowrank_kit.cli.bench import bench_app
from lowrank_kit.cli.bench_speed import speed as _bench_speed  # noqa: F401  (registers `bench speed`)
from lowrank_kit.cli.common import (
    RATIO_HELP,
    _Group,
    _parse_dtype,
    err_console,
    out,
    placement_option,
    print_json,
)
from lowrank_kit.cli.evaluate import check_perplexity_options, eval_command, text_perplexity
from lowrank_kit.cli.testbed import testbed_app
from lowrank_kit.errors import LowRankError

if TYPE_CHECKING:
    from lowrank_kit.recipe import Recipe

app = typer.Typer(
    cls=_Group,
    name="lowrank",
    help="Low-rank decomposition and quantization for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Subcommands inherit the help names through click's context: `lowrank compress -h` works too.
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(cls=_Group, help="Inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lowrank_kit {lowrank_kit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    """Options of `lowrank` itself; the app's help text above is what `lowrank -h` shows."""


# The options that build a recipe, declared once for every command that takes them (`compress`,
# `recipe show`): a command decorated with `_recipe_options` gets them all and receives the Recipe.
_RECIPE_OPTIONS: dict[str, Any] = {
    "recipe_file": Annotated[
        Path | None, typer.Option("--recipe", help="Recipe file (YAML or JSON).", dir_okay=False)
    ],
    "model": Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Alias (see `lowrank models`), hub id, local directory or `testbed`."
        ),
    ],
    "method": Annotated[
        str | None,
        typer.Option(
            "--method",
            help="Decomposer (see `lowrank methods`), with parameters as name:key=value (wsvd:finetune=true).",
        ),
    ],
    "ratio": Annotated[float | None, typer.Option("--ratio", help=RATIO_HELP)],
    "rank": Annotated[
        int | None,
        typer.Option(
            "--rank", help="Explicit rank per matrix (per head for per-head methods) instead of --ratio."
        ),
    ],
    "quant": Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="Quantization scheme: w8a8, w4a4, w8a4, w4a16, w8a16, then optionally -kv8/-kv4 (latent cache "
            "bits) and -qat (e.g. w8a8-kv8-qat); see docs/quantization.md.",
        ),
    ],
    "calib_samples": Annotated[
        int | None, typer.Option("--calib-samples", help="Number of calibration samples (default 64).")
    ],
    "seed": Annotated[int | None, typer.Option("--seed", help="Calibration seed (default 0).")],
    "granularity": Annotated[
        int | None,
        typer.Option("--granularity", help="Round ranks to multiples of this (8/16 suit the decode kernel)."),
    ],
    "rank_allocation": Annotated[
        str | None,
        typer.Option("--rank-allocation", help="uniform, importance or sensitivity (method-dependent)."),
    ],
    "calib_source": Annotated[
        str | None,
        typer.Option(
            "--calib-source",
            help="auto (default: real data for the model), testbed, tsv, hf (image questions) or text.",
        ),
    ],
    "calib_path": Annotated[
        str | None,
        typer.Option("--calib-path", help="TSV file or save_to_disk directory for --calib-source tsv/hf."),
    ],
    "calib_dataset": Annotated[
        str | None,
        typer.Option(
            "--calib-dataset",
            help="Calibration dataset: a hub id of ScienceQA-style image questions (e.g. "
            "derek-thomas/ScienceQA), or a text corpus: text:pydoc, text:PATH, hf:DATASET[:CONFIG].",
        ),
    ],
    "calib_config": Annotated[
        str | None, typer.Option("--calib-config", help="Config (subset) of the --calib-dataset hub dataset.")
    ],
    "calib_max_length": Annotated[
        int | None,
        typer.Option(
            "--calib-max-length", help="Tokens per calibration sample (a text window; default 2048)."
        ),
    ],
    "calib_split": Annotated[
        str | None, typer.Option("--calib-split", help="Split of the calibration dataset (default train).")
    ],
}


def _build_recipe(recipe_file: Path | None, model: str | None, **step_flags: Any) -> Recipe:
    """The recipe of ``--recipe`` (``--model`` may replace its model) or of the step flags."""
    from lowrank_kit.recipe import DEFAULT_MODEL, RecipeError, load_recipe, recipe_from_flags

    if recipe_file is not None:
        given = [f"--{name.replace('_', '-')}" for name, value in step_flags.items() if value is not None]
        if given:
            raise RecipeError(
                f"--recipe cannot be combined with {', '.join(given)}; put them in the recipe file"
            )
        loaded = load_recipe(recipe_file)
        return loaded.model_copy(update={"model": model}) if model else loaded
    return recipe_from_flags(model=model or DEFAULT_MODEL, **step_flags)


def _recipe_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the options of :data:`_RECIPE_OPTIONS` (before its own); it is called with
    ``recipe``, the :class:`~lowrank_kit.recipe.Recipe` they describe, in their place."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    shared = [inspect.Parameter(n, keyword, default=None, annotation=a) for n, a in _RECIPE_OPTIONS.items()]
    own = [
        p.replace(kind=keyword) for p in inspect.signature(command).parameters.values() if p.name != "recipe"
    ]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        flags = {name: kwargs.pop(name) for name in _RECIPE_OPTIONS}
        command(recipe=_build_recipe(**flags), **kwargs)

    # typer reads the options from the signature and resolves the command's own (string) annotations
    # in this module's namespace; `recipe` is not an option, so its annotation is never evaluated.
    run.__signature__ = inspect.Signature([*shared, *own])
    run.__annotations__ = {p.name: p.annotation for p in (*shared, *own)}
    return run


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
    evaluation = report.get("evaluation")
    if evaluation:
        table.add_row(
            f"perplexity ({evaluation['data']}, {evaluation['windows']}×{evaluation['seq_len']} tokens)",
            f"{evaluation['perplexity']:.4f}",
        )
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
@_recipe_options
def compress(
    recipe: Recipe,
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output directory (default: ./<model>-<method>-<ratio>)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    device: str | None = typer.Option(
        None,
        "--device",
        help="Device to compress on (cpu, cuda, cuda:1); default cpu. With --device-map sequential/auto: the "
        "device the layers run on (default: the first GPU).",
    ),
    device_map: str | None = typer.Option(
        None,
        "--device-map",
        help="cpu, cuda[:N] (the whole model there), sequential (model in host memory, one decoder layer at "
        "a time on the GPU) or auto (as many layers resident on the GPU as --max-gpu-memory allows, the rest "
        "streamed).",
    ),
    max_gpu_memory: str | None = typer.Option(
        None, "--max-gpu-memory", help="With --device-map auto: GPU memory budget per GPU, e.g. 40GiB."
    ),
    max_shard_size: str = typer.Option(
        "50GB", "--max-shard-size", help="Split the saved weights into files of at most this size."
    ),
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
    eval_data: str | None = typer.Option(
        None,
        "--eval-data",
        help="A text model: also score perplexity on the evaluation part of this corpus (text:pydoc, "
        "text:PATH, hf:DATASET[:CONFIG]) before saving; the report keeps it as `evaluation`.",
    ),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="With --eval-data: tokens per window."),
    eval_limit: int | None = typer.Option(16, "--eval-limit", help="With --eval-data: windows scored."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Compress a model: decompose (--method/--ratio) and/or quantize (--quant), then save it."""
    from lowrank_kit.pipeline import compress_to_directory
    from lowrank_kit.progress import RichReporter

    placement = placement_option(device, device_map, max_gpu_memory)

    evaluate = None
    if eval_data is not None:
        evaluate = _perplexity_evaluation(recipe.model, eval_data, eval_seq_len, eval_limit)

    if output is None:
        dec = recipe.decompose
        parts = [Path(recipe.model).name or "model"]
        if dec is not None:
            parts += [dec.method, str(dec.ratio if dec.ratio is not None else f"rank{dec.rank}")]
        parts += [q.scheme for q in recipe.quantize]
        output = Path("-".join(parts))
    torch_dtype = _parse_dtype(dtype)
    result = compress_to_directory(
        recipe,
        output,
        overwrite=overwrite,
        reporter=RichReporter(err_console),
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
        use_cache=not no_cache,
        evaluate=evaluate,
        placement=placement,
        max_shard_size=max_shard_size,
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
                "evaluation": report.get("evaluation"),
                "report": str(Path(report["output"]) / "lowrank_report.json"),
            }
        )
    else:
        out.print(_summary_table(report))


def _perplexity_evaluation(model: str, data: str, seq_len: int, limit: int | None):
    """compress --eval-data: checked before any work; scores the compressed model before it is saved."""
    from lowrank_kit.loading import calibration_context

    check_perplexity_options(data, seq_len, limit, flag="eval-")
    context = calibration_context(model)
    if context is not None and not context["text_only"]:
        raise LowRankError(
            f"--eval-data scores perplexity of a text model, and {model!r} is a vision-language model; "
            "evaluate its checkpoint with `lowrank eval CHECKPOINT --data ...`"
        )

    def evaluate(result) -> dict[str, Any]:
        if not result.adapter.text_only or result.processor is None:
            raise LowRankError(f"--eval-data needs a text model with a tokenizer; {model!r} is not one")
        return text_perplexity(
            result.model, result.processor, data, split=None, limit=limit, seq_len=seq_len, batch_size=4
        )

    return evaluate


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
    from lowrank_kit.loading import list_models

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
@_recipe_options
def recipe_show(
    recipe: Recipe,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the resolved recipe (every method parameter filled in, and the calibration data the model
    will get) that flags or a file describe."""
    from lowrank_kit.data.sources import resolve_calibration
    from lowrank_kit.loading import calibration_context
    from lowrank_kit.recipe import resolve_recipe

    r = resolve_recipe(recipe)
    context = calibration_context(r.model)
    if context is None:
        err_console.print(
            f"calibration.source stays 'auto': the config of {r.model!r} is not available offline, so it is "
            "chosen when the model loads (ScienceQA for a VLM, wikitext-2 for a text model)"
        )
    else:
        r = r.model_copy(update={"calibration": resolve_calibration(r.calibration, **context)})
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
