"""The decode-attention benchmark (lowrank_kit.bench.kernel, benchmarks/attention_decode.py): its shapes
read from the presets and equal to its built-in table, its settings, the script's command line and plot."""

import json
import sys

import pytest
import torch
from script_helpers import load_benchmark_script

from lowrank_kit.bench.kernel import MODELS, KernelSettings, attention_shape, grid_shapes, run
from lowrank_kit.errors import LowRankError, UnknownNameError


@pytest.mark.parametrize("alias", sorted(MODELS))
def test_built_in_shapes_are_the_presets(alias):
    assert {k: v for k, v in attention_shape(alias).items() if k != "qk_norm"} == MODELS[alias]
    assert attention_shape(alias)["qk_norm"] is None


def test_shape_of_a_qk_norm_gqa_preset():
    assert attention_shape("molmo2-8b") == dict(
        num_heads=32, num_kv_heads=8, head_dim=128, bias=False, mrope_section=None, qk_norm="per_head"
    )


def test_unknown_alias():
    with pytest.raises(UnknownNameError, match=r"unknown model alias 'llava'; available: .*llava-next-7b"):
        attention_shape("llava")


def test_run_command_passes_the_chosen_models_and_grid(monkeypatch):
    script = load_benchmark_script("attention_decode")
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        script,
        "run",
        lambda settings, models, rhos, say: seen.update(settings=settings, models=models, rhos=rhos),
    )
    argv = ["attention_decode.py", "run", "--out", "x.json", "--grid", "full", "--models", "qwen2-vl-7b"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rhos", "0.5", "0.7"])
    script.main()
    assert seen["models"] == {"qwen2-vl-7b": MODELS["qwen2-vl-7b"]} and seen["rhos"] == (0.5, 0.7)
    assert seen["settings"].grid == "full" and seen["settings"].batches == [1, 4, 16, 64]
    monkeypatch.setattr(sys, "argv", [*argv[:3], "x.json"])
    script.main()
    assert list(seen["models"]) == list(MODELS)  # every shape by default
    monkeypatch.setattr(sys, "argv", [*argv[:5], "--models", "llava"])
    with pytest.raises(SystemExit):  # argparse: invalid choice, listing the valid ones
        script.main()


def test_grid_shapes():
    s = KernelSettings(out="x.json", batches=[1, 16, 64], lengths=[1024, 8192])
    # cross: every length at the target batch (16), every other batch at the target length (8192).
    assert grid_shapes(s) == [(16, 1024), (16, 8192), (1, 8192), (64, 8192)]
    s.grid = "full"
    assert grid_shapes(s) == [(b, n) for b in (1, 16, 64) for n in (1024, 8192)]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"grid": "diagonal"}, r"unknown grid 'diagonal'; available: cross, full"),
        ({"batches": [16, 0]}, r"batches must be one or more positive integers, got \[16, 0\]"),
        ({"lengths": []}, r"lengths must be one or more positive integers, got \[\]"),
        ({"sweep_classes": ["fp16", "fp8"]}, r"unknown sweep class 'fp8'; available: fp16, int8, .*grouped$"),
    ],
)
def test_bad_settings(settings, match, tmp_path):
    with pytest.raises(LowRankError, match=match):
        KernelSettings(out="x.json", **settings).validate()
    with pytest.raises(LowRankError, match=match):  # run() checks them before any GPU work
        run(KernelSettings(out=tmp_path / "x.json", **settings))
    assert not (tmp_path / "x.json").exists()


def _result(device, model, rows, skipped=()):
    base = dict(model=model, heads=32, kv_heads=32, head_dim=128)
    out = []
    for batch, length, sdpa_us, latent_us in rows:
        shape = dict(base, batch=batch, length=length)
        out.append(dict(shape, impl="sdpa", us=sdpa_us, best_backend="cudnn", GB_s=1.0, frac_copy=0.9))
        out.append(
            dict(
                shape,
                impl="latent",
                rho=0.5,
                ranks="uniform",
                dtype="fp16",
                us=latent_us,
                GB_s=1.0,
                frac_copy=0.8,
                speedup_vs_best_sdpa=None if latent_us is None else sdpa_us / latent_us,
            )
        )
        if latent_us is None:
            out[-1]["us"] = 1.0  # a variant whose check failed is timed but reports no speedup
    return dict(device=device, copy_TB_s=3.0, rows=out, skipped=list(skipped))


def test_plot_merges_per_model_files_into_one_table_and_figure(tmp_path, monkeypatch):
    script = load_benchmark_script("attention_decode")
    a = tmp_path / "llava.json"
    b = tmp_path / "qwen.json"
    a.write_text(
        json.dumps(
            _result(
                "H100",
                "llava-next-7b",
                [(16, 1024, 90.0, 75.0), (16, 8192, 700.0, 450.0), (64, 1024, 350.0, None)],
                skipped=["llava-next-7b B=64 S=8192: full K/V 8.6 GB > --max-kv-gb 5"],
            )
        )
    )
    b.write_text(
        json.dumps(_result("H100", "qwen2-vl-7b", [(16, 1024, 18.0, 20.0), (16, 8192, 94.0, 115.0)]))
    )
    docs = tmp_path / "docs"
    docs.mkdir()
    monkeypatch.setattr(sys, "argv", ["attention_decode.py", "plot", str(a), str(b), str(docs)])
    script.main()
    table = (docs / "kernel_table.md").read_text()
    assert (docs / "kernel_latency.png").stat().st_size > 0
    assert "**llava-next-7b, ρ2 = 0.5, uniform ranks, fp16 latents**" in table
    assert "**qwen2-vl-7b, ρ2 = 0.5, uniform ranks, fp16 latents**" in table
    assert "| 16 | 1.20× (80%) | 1.56× (80%) |" in table  # 90/75 and 700/450
    assert "| 64 | check failed | — |" in table  # a failed check and a shape the run skipped
    assert "full K/V 8.6 GB > --max-kv-gb 5" in table
    assert "| qwen2-vl-7b | 16 | 8192 | latent | 0.5 | uniform | fp16 | 115.0 |" in table

    b.write_text(json.dumps(_result("H200", "qwen2-vl-7b", [(16, 1024, 18.0, 20.0)])))
    with pytest.raises(SystemExit, match="different devices"):
        script.main()

    monkeypatch.setattr(
        sys, "argv", ["attention_decode.py", "plot", str(tmp_path / "missing.json"), str(docs)]
    )
    with pytest.raises(SystemExit, match="missing.json: no such file"):
        script.main()
    b.write_text("{not json")
    monkeypatch.setattr(sys, "argv", ["attention_decode.py", "plot", str(b), str(docs)])
    with pytest.raises(SystemExit, match="qwen.json: not a JSON file"):
        script.main()
    b.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no 'rows' and 'device'"):
        script.main()
