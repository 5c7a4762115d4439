import json

import pytest

from lowrank_kit.errors import RecipeError, UnknownNameError
from lowrank_kit.methods.base import MethodConfig
from lowrank_kit.recipe import (
    RHO1_MEANING,
    DecomposeStep,
    Recipe,
    check_fraction,
    load_recipe,
    parse_fractions,
    parse_list,
    parse_recipe,
    recipe_from_flags,
    resolve_recipe,
    save_recipe,
)
from lowrank_kit.registry import get_registry


def _recipe(**step):
    return {"model": "testbed", "steps": [{"type": "decompose", "method": "svd", "ratio": 0.6, **step}]}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_is_exact(tmp_path, suffix):
    r = parse_recipe(
        {
            "model": "smolvlm",
            "calibration": {
                "source": "tsv",
                "path": "data.tsv",
                "num_samples": 16,
                "seed": 3,
                "max_length": 512,
            },
            "steps": [
                {
                    "type": "decompose",
                    "method": "svd",
                    "ratios": {"q_proj": 0.5, "k_proj": 0.7, "v_proj": 0.9},
                    "granularity": 8,
                    "params": {"beta": 0.25},
                },
                {"type": "quantize", "scheme": "w8a8", "methods": ["rtn"], "params": {"rtn": {}}},
            ],
        }
    )
    path = save_recipe(r, tmp_path / f"r{suffix}")
    again = load_recipe(path)
    assert again == r
    assert again.to_dict() == r.to_dict()


def test_flags_build_the_same_recipe_as_a_file(tmp_path):
    flags = recipe_from_flags(model="testbed", method="svd", ratio=0.6, calib_samples=8, seed=2)
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: testbed\ncalibration: {num_samples: 8, seed: 2}\nsteps:\n  - {type: decompose, method: svd, ratio: 0.6}\n"
    )
    assert load_recipe(path) == flags


def test_defaults_target_qkv():
    step = parse_recipe(_recipe()).steps[0]
    assert isinstance(step, DecomposeStep)
    assert step.targets == ["q_proj", "k_proj", "v_proj"]
    assert step.ratio_for() == {"q_proj": 0.6, "k_proj": 0.6, "v_proj": 0.6}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_recipe(ratio=1.7), r"steps\[0\]\.ratio: .*must be in \(0, 1\].*got 1.7"),
        (_recipe(ratio=0.0), r"steps\[0\]\.ratio: .*got 0.0"),
        (_recipe(ratio=-0.1), r"steps\[0\]\.ratio"),
        (_recipe(typo=1), r"steps\[0\]\.typo: unknown field"),
        ({"model": "x", "steps": [], "extra": 1}, r"extra: unknown field"),
        ({"model": "x", "steps": []}, r"steps: List should have at least 1 item"),
        (_recipe(ratio=None), r"give exactly one of ratio, ratios, rank \(got none\)"),
        (_recipe(rank=4), r"give exactly one of ratio, ratios, rank \(got ratio, rank\)"),
        (_recipe(rank=0, ratio=None), r"steps\[0\]\.rank: Input should be greater than or equal to 1"),
        (
            _recipe(targets=["q_proj", "o_proj"]),
            r"steps\[0\]\.targets\[1\]: Input should be 'q_proj', 'k_proj' or 'v_proj'",
        ),
        (_recipe(targets=["q_proj", "q_proj"]), r"targets must not repeat"),
        (_recipe(granularity=0), r"steps\[0\]\.granularity"),
        (_recipe(ratio=None, ratios={"q_proj": 0.5}), r"ratios must give one ratio per target"),
        ({"steps": [{"type": "prune"}]}, r"steps\[0\]: Input tag 'prune' found using 'type' does not match"),
        (
            {"calibration": {"num_samples": 0}, "steps": [{"type": "quantize", "scheme": "w8a8"}]},
            r"calibration\.num_samples",
        ),
        (
            {"calibration": {"source": "tsv"}, "steps": [{"type": "quantize", "scheme": "w8a8"}]},
            r"source 'tsv' needs `path`",
        ),
        (
            {"version": 9, "steps": [{"type": "quantize", "scheme": "w8a8"}]},
            r"version: .*recipe version 9 is not supported",
        ),
        (
            {
                "steps": [
                    {"type": "quantize", "scheme": "w8a8"},
                    {"type": "decompose", "method": "svd", "ratio": 0.5},
                ]
            },
            r"quantize steps must come after the decompose step",
        ),
        ([1, 2], r"expected a mapping at the top level"),
    ],
)
def test_validation_errors_name_the_field(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_method_params_are_validated_by_the_method_config():
    with pytest.raises(
        RecipeError, match=r"steps\[0\]\.params\.beta: Input should be less than or equal to 1"
    ):
        resolve_recipe(parse_recipe(_recipe(params={"beta": 2.0})))
    with pytest.raises(RecipeError, match=r"steps\[0\]\.params\.alpha: unknown field"):
        resolve_recipe(parse_recipe(_recipe(params={"alpha": 0.5})))


def test_resolve_fills_defaults_and_checks_names():
    resolved = resolve_recipe(parse_recipe(_recipe()))
    assert resolved.steps[0].params == {"beta": 0.5}
    assert resolved.steps[0].rank_allocation == "uniform"
    with pytest.raises(UnknownNameError, match=r"unknown decomposer 'nope'; available: .*svd"):
        resolve_recipe(parse_recipe(_recipe(method="nope")))
    with pytest.raises(RecipeError, match=r"rank_allocation: method 'svd' supports uniform, got 'magic'"):
        resolve_recipe(parse_recipe(_recipe(rank_allocation="magic")))


def test_every_registered_config_round_trips():
    reg = get_registry()
    for kind in ("decomposer", "quantizer"):
        for name in reg.names(kind):
            cfg_cls = reg.get(kind, name).config_class
            assert issubclass(cfg_cls, MethodConfig)
            cfg = cfg_cls()
            assert cfg_cls.model_validate(json.loads(cfg.model_dump_json())) == cfg


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file '.*missing.yaml' does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed\n")
    with pytest.raises(RecipeError, match=r"is not valid YAML"):
        load_recipe(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{")
    with pytest.raises(RecipeError, match=r"is not valid JSON"):
        load_recipe(badj)


def test_flag_errors():
    with pytest.raises(RecipeError, match="--method needs --ratio"):
        recipe_from_flags(method="svd")
    with pytest.raises(RecipeError, match="need --method"):
        recipe_from_flags(ratio=0.5)
    with pytest.raises(RecipeError, match="nothing to do"):
        recipe_from_flags()
    with pytest.raises(RecipeError, match=r"quantizer methods need --quant"):
        recipe_from_flags(method="svd", ratio=0.5, quant_methods=["rtn"])


def test_flags_choose_the_quantizers_of_a_scheme():
    recipe = resolve_recipe(recipe_from_flags(quant="w4a4", quant_methods=["rtn"]))
    assert recipe.quantize[0].methods == ["rtn"]
    assert resolve_recipe(recipe_from_flags(quant="w4a4")).quantize[0].methods != ["rtn"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("model: testbed\nsteps:\n  - {type: decompose, method: svd, ratio: 0.5}\nmodel: other\n", "1 and 4"),
        ("steps:\n  - type: decompose\n    method: svd\n    ratio: 0.5\n    ratio: 0.6\n", "4 and 5"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_key_and_file(tmp_path, text, line):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    key = "model" if text.startswith("model") else "ratio"
    with pytest.raises(
        RecipeError,
        match=rf"^recipe file '.*twice.yaml' sets '{key}' twice in one mapping \(lines {line}\); keep one of them$",
    ):
        load_recipe(path)


def test_a_key_given_twice_in_json_is_an_error(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"steps": [{"type": "decompose", "method": "svd", "ratio": 0.5, "ratio": 0.4}]}')
    with pytest.raises(RecipeError, match=r"recipe file '.*twice.json' sets 'ratio' twice in one mapping;"):
        load_recipe(path)


def test_a_merge_key_may_be_overridden(tmp_path):
    # `<<:` merges a mapping whose keys the explicit ones beside it override: that is no duplicate.
    path = tmp_path / "merge.yaml"
    path.write_text("steps:\n  - <<: {type: decompose, method: svd, ratio: 0.4}\n    ratio: 0.5\n")
    assert load_recipe(path).steps[0].ratio == 0.5


def test_comma_separated_flag_values():
    assert parse_list(" svd, wsvd,,", "--methods") == ["svd", "wsvd"]
    assert parse_fractions("0.9, 0.5,1", "--ratios") == [0.9, 0.5, 1.0]
    assert check_fraction(0.25, "--ratio") == 0.25
    with pytest.raises(RecipeError, match=r"^--methods needs a comma-separated list, got ' , '$"):
        parse_list(" , ", "--methods")
    with pytest.raises(RecipeError, match=r"^--rho2 lists a value twice: '0.5,0.5'$"):
        parse_fractions("0.5,0.5", "--rho2")
    with pytest.raises(
        RecipeError, match=r"^--rho2: 'half' is not a number; give fractions in \(0, 1\], e.g. 0.9,0.5$"
    ):
        parse_fractions("half", "--rho2")
    with pytest.raises(RecipeError, match=r"^--rho2: 1.5 is outside \(0, 1\]$"):
        parse_fractions("1.5", "--rho2")
    with pytest.raises(
        RecipeError, match=r"^--ratio: 0.0 is outside \(0, 1\]; ρ1 is the fraction of parameters kept$"
    ):
        check_fraction(0.0, "--ratio", RHO1_MEANING)


def test_recipe_is_frozen_against_typos_on_assignment():
    r = Recipe.model_validate(_recipe())
    with pytest.raises(ValueError):
        r.steps[0].ratio = 3.0


def test_a_method_flag_carries_its_parameters():
    from lowrank_kit.errors import RecipeError
    from lowrank_kit.recipe import recipe_from_flags

    recipe = recipe_from_flags(method="wsvd:finetune=true:ft_steps=7", ratio=0.5)
    assert (recipe.decompose.method, recipe.decompose.params) == ("wsvd", {"finetune": True, "ft_steps": 7})
    with pytest.raises(RecipeError, match="both set 'finetune'"):
        recipe_from_flags(method="wsvd:finetune=true", ratio=0.5, params={"finetune": False})
    with pytest.raises(RecipeError, match="--method: 'wsvd:ft_steps': 'ft_steps' is not key=value"):
        recipe_from_flags(method="wsvd:ft_steps", ratio=0.5)
