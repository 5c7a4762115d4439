"""Scheme names, their resolution into quantize steps, the CLI, and the recipe-level errors."""

import json

import pytest
from typer.testing import CliRunner

import lowrank_kit
from lowrank_kit.cli.main import app
from lowrank_kit.errors import RecipeError, UnknownNameError
from lowrank_kit.quant.schemes import resolve_scheme
from lowrank_kit.recipe import parse_recipe, resolve_recipe

runner = CliRunner()


@pytest.mark.parametrize(
    ("name", "methods", "bits"),
    [
        ("w8a8", ("hadamard", "rtn"), (8, 8, None)),
        ("w4a4", ("hadamard", "rtn"), (4, 4, None)),
        ("w8a4", ("hadamard", "rtn"), (8, 4, None)),
        ("w4a16", ("hadamard", "rtn"), (4, None, None)),
        ("w8a16", ("rtn",), (8, None, None)),
        ("w8a8-kv8", ("hadamard", "rtn"), (8, 8, 8)),
        ("w8a4-kv4", ("hadamard", "rtn"), (8, 4, 4)),
        ("w8a8-kv8-qat", ("hadamard", "qat", "rtn"), (8, 8, 8)),
        ("w8a16-qat", ("qat", "rtn"), (8, None, None)),
        ("W8A8-KV8", ("hadamard", "rtn"), (8, 8, 8)),
    ],
)
def test_schemes_resolve(name, methods, bits):
    s = resolve_scheme(name)
    assert s.methods == methods
    assert (s.weight_bits, s.act_bits, s.kv_bits) == bits
    assert s.name == name.lower()
    assert s.cache_bits == (bits[2] or 16)


@pytest.mark.parametrize("name", ["w8a9", "w16a16", "w8a8-kv2", "w8a8-qat-kv8", "int8", "", "w8a8-"])
def test_unknown_schemes_list_the_valid_ones(name):
    with pytest.raises(
        UnknownNameError, match=r"unknown quantization scheme .*; valid: w8a8, w4a4, w8a4, w4a16, w8a16"
    ):
        resolve_scheme(name)


def test_recipe_errors():
    def resolve(step):
        return resolve_recipe(parse_recipe({"model": "llava", "steps": [{"type": "quantize", **step}]}))

    with pytest.raises(RecipeError, match=r"steps\[0\].scheme: unknown quantization scheme 'w9a9'"):
        resolve({"scheme": "w9a9"})
    with pytest.raises(RecipeError, match=r"params: parameters for qat, which this step does not run"):
        resolve({"scheme": "w8a8", "params": {"qat": {}}})
    with pytest.raises(RecipeError, match=r"params.rtn.act_clip: Input should be less than or equal to 1"):
        resolve({"scheme": "w8a8", "params": {"rtn": {"act_clip": 2}}})
    with pytest.raises(RecipeError, match=r"params.hadamard.sede: unknown field"):
        resolve({"scheme": "w8a8", "params": {"hadamard": {"sede": 1}}})
    with pytest.raises(UnknownNameError, match=r"unknown quantizer 'gptq'; available: hadamard, qat, rtn"):
        resolve({"scheme": "w8a8", "methods": ["gptq"]})
    resolved = resolve({"scheme": "w4a4", "methods": ["rtn"]})
    assert resolved.steps[0].methods == ["rtn"] and resolved.steps[0].params["rtn"]["clip_search"] is True


def test_one_quantize_step_per_recipe():
    from quant_helpers import tiny

    recipe = parse_recipe(
        {
            "model": "llava",
            "steps": [{"type": "quantize", "scheme": "w8a8"}, {"type": "quantize", "scheme": "w8a16"}],
        }
    )
    with pytest.raises(RecipeError, match="a recipe may contain one quantize step .*got 2"):
        lowrank_kit.compress(tiny("llava"), recipe)


def test_recipe_show_resolves_the_scheme():
    res = runner.invoke(app, ["recipe", "show", "--quant", "w8a8", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    step = json.loads(res.stdout)["steps"][0]
    assert step["scheme"] == "w8a8" and step["methods"] == ["hadamard", "rtn"]
    assert step["params"]["rtn"] == {
        "clip_search": True,
        "act_clip": 1.0,
        "vision": False,
        "vision_act_clip": 0.9,
    }
    assert step["params"]["hadamard"]["seed"] == 0
    res = runner.invoke(app, ["recipe", "show", "--method", "wsvd", "--ratio", "0.5", "--quant", "w8a8-qat"])
    assert res.exit_code == 0 and "qat:" in res.stdout and "cayley_lr: 1.0" in res.stdout


def test_cli_unknown_scheme_is_one_line():
    res = runner.invoke(app, ["recipe", "show", "--quant", "w3a3"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "unknown quantization scheme 'w3a3'; valid:" in errors[0]


def test_methods_lists_the_quantizers():
    res = runner.invoke(app, ["methods", "--json"], catch_exceptions=False)
    assert set(json.loads(res.stdout)["quantizers"]) >= {"rtn", "hadamard", "qat"}
