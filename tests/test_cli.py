"""The `lowrank` CLI through typer's CliRunner."""

import json

import pytest
from typer.testing import CliRunner

from lowrank_kit.cli.main import app
from lowrank_kit.models.tiny import save_tiny_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    save_tiny_checkpoint("llava", path)
    return path


def test_models_json_lists_the_five_families():
    res = invoke("models", "--json")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert {"llava", "llava_next", "smolvlm", "qwen2_vl", "molmo2"} <= {r["family"] for r in rows}
    assert all({"name", "family", "hub_id"} <= set(r) for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["smolvlm"]["hub_id"] == "HuggingFaceTB/SmolVLM-Instruct"


def test_methods_and_plugins_json():
    methods = json.loads(invoke("methods", "--json").stdout)
    assert "svd" in methods["decomposers"] and isinstance(methods["quantizers"], list)
    plugins = json.loads(invoke("plugins", "--json").stdout)
    builtin = next(p for p in plugins if p["name"] == "lowrank_kit.builtin")
    assert "svd" in builtin["registered"]["decomposer"]


def test_recipe_show_prints_the_resolved_recipe():
    res = invoke("recipe", "show", "--method", "svd", "--ratio", "0.6", "--json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["steps"][0]["params"] == {"beta": 0.5}
    assert data["steps"][0]["rank_allocation"] == "uniform"


def test_compress_writes_a_model_that_loads_and_generates(tiny_dir, tmp_path):
    import torch

    import lowrank_kit
    from lowrank_kit.models.tiny import tiny_inputs

    out = tmp_path / "out"
    res = invoke(
        "compress", "--model", tiny_dir, "--method", "svd", "--ratio", "0.6", "--output", out, "--json"
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"method", "quant", "rho1", "rho2", "output", "seconds"} <= set(data)
    assert data["method"] == "svd" and data["quant"] is None
    loaded = lowrank_kit.load(out)
    report = json.loads((out / "lowrank_report.json").read_text())
    assert report["rho1"] == data["rho1"]
    # Independent count: factor parameters in the saved weights over the dense q/k/v they replaced.
    info = loaded.adapter.info(loaded.model)
    factor = sum(
        p.numel()
        for name, p in loaded.model.named_parameters()
        if any(f".{t}." in name for t in ("q_proj", "k_proj", "v_proj"))
        and "language_model" in name
        and name.endswith("weight")
        and ("up." in name or "down." in name)
    )
    dense = info.num_layers * info.hidden_size * (info.num_heads + 2 * info.num_kv_heads) * info.head_dim
    assert data["rho1"] == pytest.approx(factor / dense, abs=1e-12)
    tokens = loaded.model.generate(**tiny_inputs(loaded.model), max_new_tokens=3, do_sample=False)
    assert tokens.shape[-1] >= 3
    assert isinstance(tokens, torch.Tensor)


def test_summary_table_without_json(tiny_dir, tmp_path):
    res = invoke(
        "compress", "--model", tiny_dir, "--method", "svd", "--ratio", "0.5", "--output", tmp_path / "o"
    )
    assert res.exit_code == 0, res.output
    for needle in ("parameters before", "ρ1", "ρ2", "rank q_proj", "wall time"):
        assert needle in res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "nope", "--ratio", "0.5"), "unknown decomposer 'nope'; available:"),
        (("--method", "svd", "--ratio", "1.7"), "ratio ρ1 must be in (0, 1]"),
        (("--method", "svd", "--ratio", "0"), "ratio ρ1 must be in (0, 1]"),
        (("--method", "svd"), "--method needs --ratio"),
    ],
)
def test_bad_flags_fail_cleanly_and_leave_no_output(tiny_dir, tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["compress", "--model", str(tiny_dir), *args, "--output", str(out)])
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory beside it either


def test_bad_recipe_and_missing_model_fail_cleanly(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {type: decompose, method: svd, ratio: 0.5, colour: red}\n")
    out = tmp_path / "out"
    res = runner.invoke(app, ["compress", "--recipe", str(recipe), "--output", str(out)])
    assert res.exit_code != 0 and "steps[0].colour: unknown field" in res.output and not out.exists()
    res = runner.invoke(
        app,
        [
            "compress",
            "--model",
            str(tmp_path / "nowhere"),
            "--method",
            "svd",
            "--ratio",
            "0.5",
            "--output",
            str(out),
        ],
    )
    assert res.exit_code != 0 and "nowhere" in res.output and "does not exist" in res.output
    assert not out.exists() and "Traceback" not in res.output


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(
        app, ["compress", "--model", str(tiny_dir), "--method", "svd", "--ratio", "0.5", "--output", str(out)]
    )
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert (out / "keep.txt").read_text() == "mine"
    res = runner.invoke(
        app,
        [
            "compress",
            "--model",
            str(tiny_dir),
            "--method",
            "svd",
            "--ratio",
            "0.5",
            "--output",
            str(out),
            "--overwrite",
        ],
    )
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_recipe_cannot_be_mixed_with_step_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {type: decompose, method: svd, ratio: 0.5}\n")
    res = runner.invoke(app, ["recipe", "show", "--recipe", str(recipe), "--ratio", "0.4"])
    assert res.exit_code != 0 and "--recipe cannot be combined with --ratio" in res.output


def test_compress_and_recipe_show_take_the_same_recipe_options():
    import typer

    from lowrank_kit.cli import main

    root = typer.main.get_command(app)

    def recipe_options(cmd):
        return {p.name: (p.opts, p.help, p.default) for p in cmd.params if p.name in main._RECIPE_OPTIONS}

    compress = recipe_options(root.commands["compress"])
    show = recipe_options(root.commands["recipe"].commands["show"])
    assert len(compress) == len(main._RECIPE_OPTIONS) == 16
    assert compress == show
    assert compress["recipe_file"][0] == ["--recipe"] and compress["model"][0] == ["--model", "-m"]


@pytest.mark.parametrize("command", [(), ("compress",), ("recipe", "show"), ("bench", "accuracy"), ("eval",)])
def test_h_is_help(command):
    long, short = invoke(*command, "--help"), invoke(*command, "-h")
    assert long.exit_code == short.exit_code == 0
    assert short.stdout == long.stdout and "Usage: lowrank" in short.stdout


def test_version_prints_the_version_and_exits_0():
    import lowrank_kit

    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout == f"lowrank_kit {lowrank_kit.__version__}\n"


# Exit codes (docs/cli.md): 0 success, 1 a failed run, 2 bad input, 130 interrupted.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("compress", "--colour", "red"), "No such option: --colour"),
        (("recipe", "show", "--ratio", "half"), "Invalid value for '--ratio'"),
        (("recipe", "show", "--method", "svd", "--ratio", "1.5"), "Error: invalid options: steps[0].ratio"),
        (("recipe", "show"), "Error: nothing to do"),
    ],
)
def test_bad_input_exits_2(args, message):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_a_failed_run_exits_1(monkeypatch, tmp_path):
    import lowrank_kit.pipeline as pipeline

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pipeline, "compress_to_directory", crash)
    res = runner.invoke(app, ["compress", "--method", "svd", "--ratio", "0.5", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)


def test_an_interrupted_run_exits_130(monkeypatch, tmp_path):
    import lowrank_kit.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compress_to_directory", interrupted)
    res = runner.invoke(app, ["compress", "--method", "svd", "--ratio", "0.5", "-o", str(tmp_path / "o")])
    assert res.exit_code == 130  # 128 + SIGINT, as a shell reports Ctrl-C


def test_recipe_show_resolves_auto_calibration_to_real_data():
    import json

    vlm = json.loads(
        invoke(
            "recipe", "show", "--model", "llava-1.5-7b", "--method", "wsvd", "--ratio", "0.6", "--json"
        ).stdout
    )
    assert vlm["calibration"]["source"] == "hf" and vlm["calibration"]["dataset"] == "derek-thomas/ScienceQA"
    testbed = json.loads(invoke("recipe", "show", "--method", "svd", "--ratio", "0.6", "--json").stdout)
    assert testbed["calibration"]["source"] == "testbed"
    packaged = json.loads(
        invoke(
            "recipe", "show", "--model", "smollm2-135m", "--method", "svdllm", "--ratio", "0.7", "--json"
        ).stdout
    )
    assert packaged["calibration"] == {**packaged["calibration"], "source": "text", "dataset": "text:pydoc"}
    named = json.loads(
        invoke(
            "recipe",
            "show",
            "--model",
            "smollm2-135m",
            "--method",
            "svdllm",
            "--ratio",
            "0.7",
            "--calib-dataset",
            "hf:Salesforce/wikitext:wikitext-2-raw-v1",
            "--calib-max-length",
            "256",
            "--json",
        ).stdout
    )
    assert named["calibration"]["source"] == "text"
    assert named["calibration"]["dataset"] == "hf:Salesforce/wikitext:wikitext-2-raw-v1"
    assert named["calibration"]["max_length"] == 256


def test_image_questions_for_a_text_model_are_refused():
    result = invoke(
        "recipe",
        "show",
        "--model",
        "smollm2-135m",
        "--method",
        "svdllm",
        "--ratio",
        "0.7",
        "--calib-source",
        "hf",
        "--calib-dataset",
        "derek-thomas/ScienceQA",
    )
    assert result.exit_code == 2
    assert "holds image questions, but this is a text-only model" in result.output
