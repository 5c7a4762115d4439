from pathlib import Path

from lowrank_kit.cli.reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/cli.md is stale: run `python -m lowrank_kit.cli.reference > docs/cli.md`"
    )
