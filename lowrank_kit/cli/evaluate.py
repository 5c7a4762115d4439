"""``lowrank eval MODEL --data DATA``: multiple-choice accuracy, NLL and KL of the answer letter; or, on a
text corpus, perplexity (and KL against a reference model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lowrank_kit.cli.common import _parse_dtype, err_console, out, placement_option, print_json

BACKENDS = ("native", "vlmeval")

O_DATA = typer.Option(
    ...,
    "--data",
    "-d",
    help="testbed, ScienceQA_TEST / ScienceQA_VAL / SEEDBench_IMG (from $LMUData), scienceqa / seedbench "
    "(Hugging Face datasets), hf:<dataset id>, a VLMEvalKit TSV file or a save_to_disk directory; or a text "
    "corpus for perplexity: text:pydoc (built in), text:PATH, or hf:DATASET[:CONFIG] for a text model "
    "(e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1).",
)
O_SEQ_LEN = typer.Option(512, "--seq-len", help="Perplexity on text: tokens per window.")
O_LIMIT = typer.Option(None, "--limit", "-n", help="Evaluate only the first N items.")
O_SPLIT = typer.Option(None, "--split", help="Split of a datasets / testbed source (default: test).")
O_BATCH = typer.Option(8, "--batch-size", "-b", help="Items per batch (left-padded greedy decoding).")
O_TOKENS = typer.Option(32, "--max-new-tokens", help="Longest answer generated per item.")
O_STYLE = typer.Option(
    "letter",
    "--prompt-style",
    help="letter: VLMEvalKit's LLaVA-style prompt ending in \"Answer with the option's letter...\"; "
    "dataset: VLMEvalKit's generic ImageMCQDataset prompt.",
)
O_DEVICE = typer.Option("cpu", "--device", help="Device to evaluate on (cpu, cuda, cuda:1).")
O_EVAL_DEVICE = typer.Option(None, "--device", help="Device to evaluate on (cpu, cuda, cuda:1); default cpu.")
O_DEVICE_MAP = typer.Option(
    None,
    "--device-map",
    help="cpu, cuda[:N], or auto: spread the model over the GPUs, host memory and --offload-dir "
    "(accelerate), within --max-gpu-memory per GPU.",
)
O_MAX_GPU_MEMORY = typer.Option(
    None, "--max-gpu-memory", help="With --device-map auto: budget per GPU, e.g. 40GiB."
)
O_OFFLOAD_DIR = typer.Option(
    None,
    "--offload-dir",
    help="With --device-map auto: where layers that fit neither GPU nor host memory go.",
)
O_DTYPE = typer.Option(None, "--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's).")
O_NO_CACHE = typer.Option(False, "--no-cache", help="Do not read or write the per-item result cache.")
O_CACHE_DIR = typer.Option(
    None,
    "--cache-dir",
    help="Where per-item results are kept (default: eval/ under $LOWRANK_KIT_CACHE or ~/.cache/lowrank_kit).",
    file_okay=False,
)


def eval_cache(no_cache: bool, cache_dir: Path | None):
    from lowrank_kit.eval.cache import EvalCache
    from lowrank_kit.recipe import RecipeError

    if no_cache:
        if cache_dir is not None:
            raise RecipeError("--no-cache and --cache-dir contradict each other; give one of them")
        return None
    return EvalCache(cache_dir)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def result_tables(summary: dict[str, Any], model: str, data: str) -> list[Table]:
    table = Table(title="lowrank eval", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", model)
    table.add_row("data", f"{data} ({summary['n']} items)")
    table.add_row("accuracy", f"{100 * summary['accuracy']:.2f}% ({summary['correct']}/{summary['n']})")
    if summary.get("nll") is not None:
        table.add_row("NLL of the correct letter", _fmt(summary["nll"]))
    if summary.get("kl") is not None:
        table.add_row("KL(reference ‖ model) over letters", _fmt(summary["kl"], 5))
    if summary.get("reference_accuracy") is not None:
        table.add_row("reference accuracy", f"{100 * summary['reference_accuracy']:.2f}%")
    table.add_row("no option read from the answer", str(summary.get("unanswered", 0)))
    if "cache_hits" in summary:
        table.add_row("cached items", str(summary["cache_hits"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    tables = [table]
    per_cat = summary.get("per_category") or {}
    if per_cat:
        cats = Table(title="per category")
        for col in ("category", "n", "accuracy", "NLL") + (("KL",) if summary.get("kl") is not None else ()):
            cats.add_column(col, justify="left" if col == "category" else "right")
        for name, entry in per_cat.items():
            row = [name, str(entry["n"]), f"{100 * entry['accuracy']:.2f}%", _fmt(entry.get("nll"))]
            if summary.get("kl") is not None:
                row.append(_fmt(entry.get("kl"), 5))
            cats.add_row(*row)
        tables.append(cats)
    return tables


def eval_command(
    model: str = typer.Argument(
        ..., help="Alias, hub id, local directory, `testbed`, or a lowrank_kit compressed output directory."
    ),
    data: str = O_DATA,
    limit: int | None = O_LIMIT,
    split: str | None = O_SPLIT,
    batch_size: int = O_BATCH,
    max_new_tokens: int = O_TOKENS,
    prompt_style: str = O_STYLE,
    seq_len: int = O_SEQ_LEN,
    reference: str | None = typer.Option(
        None,
        "--reference",
        help="Uncompressed model to compare with: adds the KL of its option-letter distribution (on text: "
        "the mean per-token KL of its next-token distribution).",
    ),
    backend: str = typer.Option(
        "native",
        "--backend",
        help="native (lowrank_kit's batched evaluator) or vlmeval (VLMEvalKit's own inference and exact "
        "matching; needs VLMEvalKit installed from its git repository).",
    ),
    device: str | None = O_EVAL_DEVICE,
    device_map: str | None = O_DEVICE_MAP,
    max_gpu_memory: str | None = O_MAX_GPU_MEMORY,
    offload_dir: Path | None = O_OFFLOAD_DIR,
    dtype: str | None = O_DTYPE,
    no_cache: bool = O_NO_CACHE,
    cache_dir: Path | None = O_CACHE_DIR,
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Also write the full results, one entry per item, to this JSON file.",
        dir_okay=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
) -> None:
    """Evaluate a model on a multiple-choice VQA dataset, scored the way VLMEvalKit's exact matching scores it."""
    from lowrank_kit.eval.datasets import load_eval_data
    from lowrank_kit.eval.engine import EvaluationError, evaluate
    from lowrank_kit.eval.grid import write_json_atomic
    from lowrank_kit.loading import load_model
    from lowrank_kit.progress import RichReporter

    if backend not in BACKENDS:
        from lowrank_kit.errors import unknown_name

        raise unknown_name("backend", backend, BACKENDS)
    torch_dtype = _parse_dtype(dtype)
    device = placement_option(device, device_map, max_gpu_memory, offload_dir)
    reporter = RichReporter(err_console)
    if data.startswith("text:") or _text_model(model):
        summary = _perplexity(model, data, reference, split, limit, seq_len, batch_size, device, torch_dtype)
        items_out = None
    elif backend == "vlmeval":
        from lowrank_kit.eval.vlmeval_bridge import evaluate_with_vlmeval

        if reference is not None:
            raise EvaluationError(
                "--reference needs --backend native (VLMEvalKit scores generated text only)"
            )
        loaded = load_model(model, dtype=torch_dtype, device=device, reporter=reporter)
        summary = evaluate_with_vlmeval(
            loaded,
            data,
            limit=limit,
            split=split,
            max_new_tokens=max_new_tokens,
            prompt_style=prompt_style,
            reporter=reporter,
        )
        raw = summary.pop("raw_predictions")
        items_out = [{**row, "raw_prediction": text} for row, text in zip(summary.pop("items"), raw)]
    else:
        evaldata = load_eval_data(data, limit=limit, split=split)
        cache = eval_cache(no_cache, cache_dir)
        loaded = load_model(model, dtype=torch_dtype, device=device, reporter=reporter)
        ref_model = None
        if reference is not None:
            ref_model = load_model(reference, dtype=torch_dtype, device=device, reporter=reporter).model
        result = evaluate(
            loaded.model,
            loaded.processor,
            loaded.adapter,
            evaldata.items,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prompt_style=prompt_style,
            reference=ref_model,
            reporter=reporter,
            cache=cache,
            description=f"evaluate {model}",
        )
        summary = result.to_dict()
        summary["reference_accuracy"] = result.settings.get("reference_accuracy")
        items_out = [r.to_dict() for r in result.items]
    summary = {"model": model, "data": data, "backend": backend, **summary}
    if output is not None:
        write_json_atomic(output, {**summary, "items": items_out} if items_out is not None else summary)
    if as_json:
        print_json(summary)
    elif "perplexity" in summary:
        out.print(perplexity_table(summary))
    else:
        for table in result_tables(summary, model, data):
            out.print(table)


def _text_model(model: str) -> bool:
    """Whether ``model`` is a text-only language model, read without loading it (False when unknown)."""
    from lowrank_kit.loading import calibration_context

    context = calibration_context(model)
    return context is not None and context["text_only"]


def check_perplexity_options(data: str, seq_len: int, limit: int | None, flag: str = "") -> None:
    """Bad perplexity options fail before any model is loaded: one line each."""
    from lowrank_kit.data.text import parse_corpus
    from lowrank_kit.eval.engine import EvaluationError

    if seq_len < 2:
        raise EvaluationError(f"--{flag}seq-len must be at least 2 tokens, got {seq_len}")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--{flag}limit must be at least 1 window, got {limit}")
    parse_corpus(data)


def text_perplexity(
    model: Any,
    tokenizer: Any,
    data: str,
    *,
    split: str | None,
    limit: int | None,
    seq_len: int,
    batch_size: int,
    reference: Any = None,
) -> dict[str, Any]:
    """Perplexity of a loaded ``model`` on the evaluation part of the text corpus ``data``."""
    from lowrank_kit.data.text import corpus_text, token_windows
    from lowrank_kit.eval.perplexity import perplexity
    from lowrank_kit.progress import RichReporter

    windows = token_windows(
        tokenizer, corpus_text(data, "evaluation", split=split), seq_len, max_windows=limit
    )
    result = perplexity(
        model.eval(), windows, batch_size=batch_size, reference=reference, reporter=RichReporter(err_console)
    )
    return {"data": data, "part": "evaluation", "seq_len": seq_len, **result}


def _perplexity(
    model: str,
    data: str,
    reference: str | None,
    split: str | None,
    limit: int | None,
    seq_len: int,
    batch_size: int,
    device: Any,
    dtype: Any,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the evaluation part of the text corpus ``data``."""
    from lowrank_kit.eval.engine import EvaluationError
    from lowrank_kit.loading import load_model
    from lowrank_kit.progress import RichReporter

    check_perplexity_options(data, seq_len, limit)
    reporter = RichReporter(err_console)
    loaded = load_model(model, dtype=dtype, device=device, reporter=reporter)
    if loaded.processor is None:
        raise EvaluationError(f"model {model!r} has no tokenizer, so text cannot be fed to it")
    ref_model = None
    if reference is not None:
        ref_model = load_model(reference, dtype=dtype, device=device, reporter=reporter).model
    result = text_perplexity(
        loaded.model,
        loaded.processor,
        data,
        split=split,
        limit=limit,
        seq_len=seq_len,
        batch_size=batch_size,
        reference=ref_model,
    )
    return {"model": model, **result}


def perplexity_table(summary: dict[str, Any]) -> Table:
    table = Table(title="lowrank eval", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", summary["model"])
    table.add_row(
        "data",
        f"{summary['data']} (evaluation part, {summary['windows']} windows of {summary['seq_len']} tokens)",
    )
    table.add_row("perplexity", f"{summary['perplexity']:.4f}")
    table.add_row("NLL per token", _fmt(summary["nll"]))
    if summary.get("kl") is not None:
        table.add_row("KL(reference ‖ model) per token", _fmt(summary["kl"], 5))
    return table
