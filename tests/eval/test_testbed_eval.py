"""The trained testbed through `lowrank eval`: accuracy on the standard test split, and the TSV route.

Uses the testbed of the cache in force ($LOWRANK_KIT_CACHE; CI's main job builds it first).
"""

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from lowrank_kit.cli.main import app

runner = CliRunner()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("lowrank_kit.testbed.build") is None,
        reason="the testbed package (issue 3) is not in this checkout",
    ),
]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed-eval") / "native.json"
    res = runner.invoke(
        app, ["eval", "testbed", "--data", "testbed", "--json", "--no-cache", "--output", str(out)]
    )
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), json.loads(out.read_text())


def test_uncompressed_testbed_scores_at_least_90_percent(native):
    from lowrank_kit.data.synthetic import generate_items

    summary, _ = native
    assert summary["n"] == len(generate_items("test"))
    assert summary["accuracy"] >= 0.9
    assert summary["unanswered"] == 0
    assert len(summary["per_category"]) > 1


def test_exported_tsv_evaluates_identically(native, tmp_path):
    from lowrank_kit.data.synthetic import export_tsv

    export_tsv("test", tmp_path / "test.tsv")
    out = tmp_path / "tsv.json"
    res = runner.invoke(
        app,
        [
            "eval",
            "testbed",
            "--data",
            str(tmp_path / "test.tsv"),
            "--json",
            "--no-cache",
            "--output",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    summary, full = native
    via_tsv = json.loads(out.read_text())
    assert via_tsv["accuracy"] == summary["accuracy"] and via_tsv["per_category"] == summary["per_category"]
    assert [(r["prediction"], r["letter_logprobs"]) for r in via_tsv["items"]] == [
        (r["prediction"], r["letter_logprobs"]) for r in full["items"]
    ]
