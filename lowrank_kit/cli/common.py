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
    """``--device`` alone (one device), or ``--device-map`` with its budget options; with ``sequential`` or
    ``auto``, ``--device`` names the device the layers run on (default: the first GPU)."""
    from lowrank_kit.placement import PlacementError, parse_placement

    spread = device_map is not None and device_map.strip().lower() in ("auto", "sequential")
    if device is not None and device_map is not None and not spread and device != device_map:
        raise PlacementError(
            f"--device {device} and --device-map {device_map} contradict each other; give --device-map only"
        )
    execution = device if spread else None
    return parse_placement(device_map or device or "cpu", max_gpu_memory, offload_dir, execution)
