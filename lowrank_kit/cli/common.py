"""What the ``lowrank`` command modules share: the error-reporting command group, the consoles, JSON
output, the ρ1 help text and dtype names. ``main`` builds the app from the command modules."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from lowrank_kit.errors import LowRankError, unknown_name


class _Group(TyperGroup):
    """Turns every :class:`LowRankError` into one ``Error: ...`` line and a non-zero exit, no traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LowRankError as err:
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(2) from None


out = Console()
err_console = Console(stderr=True)

RATIO_HELP = "ρ1: fraction of the targeted parameters kept, in (0, 1] (0.6 keeps 60%)."


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _parse_dtype(name: str | None):
    import torch

    if name is None:
        return None
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise unknown_name("dtype", name, ["float32", "float16", "bfloat16"])
    return table[name]


def placement_option(
    device: str | None, device_map: str | None, max_gpu_memory: str | None = None, offload_dir: Any = None
):
    """The CLI's ``--device`` / ``--device-map`` / ``--max-gpu-memory`` / ``--offload-dir``."""
    from lowrank_kit.placement import resolve_placement

    return resolve_placement(device, device_map, max_gpu_memory, offload_dir)
