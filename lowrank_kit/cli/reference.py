"""Generate docs/cli.md from the typer app, so the CLI reference never drifts from the code.

``python -m lowrank_kit.cli.reference > docs/cli.md`` rewrites it; a test fails when it is stale.
"""

from __future__ import annotations

from typing import Any

import typer

from lowrank_kit.cli.main import app as lowrank_app

# What `lowrank` exits with; `_Group` (cli/common.py) turns a lowrank_kit error into code 2.
EXIT_CODES = (
    (0, "success"),
    (1, "the run failed: an unexpected error, printed with its traceback (please report it)"),
    (
        2,
        "bad input: an unknown option or a malformed value, or a lowrank_kit error about the input or the "
        "environment (a recipe, a model, data, a checkpoint, the output directory), printed as one "
        "`Error: ...` line that says what is wrong and what to do",
    ),
    (130, "interrupted (Ctrl-C)"),
)


def _options(cmd: Any) -> list[str]:
    rows = []
    for p in cmd.params:
        if p.param_type_name == "argument":
            # typer's own Argument class has no click `human_readable_name`; its metavar is the name.
            name = getattr(p, "human_readable_name", None) or p.name.upper()
            rows.append(f"| `{name}` | argument{' (required)' if p.required else ''} | |")
            continue
        if p.param_type_name != "option" or p.hidden:
            continue
        names = ", ".join(f"`{n}`" for n in [*p.opts, *p.secondary_opts])
        default = "" if p.default in (None, False) else f"`{p.default}`"
        help_text = (p.help or "").replace("|", "\\|")
        rows.append(f"| {names} | {help_text} | {default} |")
    return rows


def _walk(cmd: Any, path: list[str], out: list[str]) -> None:
    if hasattr(cmd, "commands"):
        out.append(f"## `{' '.join(path)}`\n\n{(cmd.help or '').strip()}\n")
        rows = _options(cmd)
        if rows:
            out.extend(["| option | description | default |", "|---|---|---|", *rows, ""])
        for name in sorted(cmd.commands):
            _walk(cmd.commands[name], [*path, name], out)
        return
    out.append(f"## `{' '.join(path)}`\n")
    if cmd.help:
        out.append(cmd.help.strip() + "\n")
    rows = _options(cmd)
    if rows:
        out.extend(["| option | description | default |", "|---|---|---|", *rows, ""])


def render(app: typer.Typer | None = None) -> str:
    root = typer.main.get_command(lowrank_app if app is None else app)
    out = [
        "# CLI reference",
        "",
        "Generated from the typer app by `python -m lowrank_kit.cli.reference > docs/cli.md`; a test fails when",
        "this file is stale. Every command takes `-h` / `--help`.",
        "",
        "## Exit codes",
        "",
        "| code | meaning |",
        "|---|---|",
        *(f"| {code} | {meaning} |" for code, meaning in EXIT_CODES),
        "",
    ]
    _walk(root, ["lowrank"], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
