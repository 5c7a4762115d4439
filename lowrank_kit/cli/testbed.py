"""``lowrank testbed``: build the built-in testbed, show what its build measured, export its questions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lowrank_kit.cli.common import _Group, err_console, out, print_json

testbed_app = typer.Typer(
    cls=_Group,
    help="The built-in testbed: a small LLaVA trained here on synthetic visual questions.",
    no_args_is_help=True,
)

O_SIZE = typer.Option("small", "--size", help="tiny (unit tests), small (`--model testbed`) or base.")


def _info_table(info: dict) -> Table:
    table = Table(title=f"testbed {info['size']} (v{info['version']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("path", info["path"])
    table.add_row("test accuracy", f"{info['test_accuracy']:.3f} ({info['test_items']} items)")
    for category, acc in info["test_accuracy_per_category"].items():
        table.add_row(f"  {category}", f"{acc:.3f}")
    text = info["config"]["text"]
    table.add_row(
        "decoder",
        f"{text['layers']} layers, hidden {text['hidden_size']}, {text['heads']} heads × {text['head_dim']}",
    )
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("build time", f"{info['build_seconds']:.1f} s (training {info['train_seconds']:.1f} s)")
    table.add_row("device", f"{info['environment']['device']} ({info['environment']['threads']} threads)")
    table.add_row("weights sha256", info["weights_sha256"])
    return table


@testbed_app.command("build")
def build(
    size: str = O_SIZE,
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cache holds a good build."),
    device: str | None = typer.Option(
        None, "--device", help="Device to train on (default: cpu; for base, cuda when there is one)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the build's testbed.json as JSON."),
) -> None:
    """Build the testbed (or find it in the cache) and show what its build measured."""
    from lowrank_kit.progress import RichReporter
    from lowrank_kit.testbed import ensure_testbed, testbed_info

    ensure_testbed(size, force=force, device=device, reporter=RichReporter(err_console))
    info = testbed_info(size)
    if as_json:
        print_json(info)
    else:
        out.print(_info_table(info))


@testbed_app.command("info")
def info(
    size: str = O_SIZE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a built testbed: path, test accuracy (per category), build time, parameters, weights hash."""
    from lowrank_kit.testbed import testbed_info

    data = testbed_info(size)
    if as_json:
        print_json(data)
    else:
        out.print(_info_table(data))


@testbed_app.command("export")
def export(
    output: Path = typer.Option(..., "--output", "-o", help="TSV file to write.", dir_okay=False),
    split: str = typer.Option("test", "--split", help="train, validation or test."),
    limit: int | None = typer.Option(
        None, "--limit", "-n", help="Only the first N items (default: the split's standard size)."
    ),
    seed: int = typer.Option(0, "--seed", help="Generator seed (0 is the standard set)."),
) -> None:
    """Write the testbed's questions as a VLMEvalKit multiple-choice TSV (images as base64 PNG)."""
    from lowrank_kit.data.synthetic import export_tsv

    path = export_tsv(split, output, n=limit, seed=seed)
    err_console.print(f"wrote {path}")
