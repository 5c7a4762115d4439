"""The end-to-end decode benchmark (lowrank_kit.bench.e2e, benchmarks/decode_e2e.py) on a shrunk
architecture on the CPU: what it measures, that a broken latent path reports no speedup, its errors."""

import io
import json

import pytest
import torch
from rich.console import Console
from script_helpers import load_benchmark_script

import lowrank_kit.runtime.attention as attention
from lowrank_kit.bench.e2e import E2ESettings, run_e2e, shrunk_config, summary_line
from lowrank_kit.cli.bench_speed import _e2e_table
from lowrank_kit.errors import LowRankError

# Two layers of the LLaVA-NeXT-7B text model at 1/16 of its width (2 heads of 128), a short run.
SMALL = dict(
    device="cpu", dtype="float32", layers=2, hidden_scale=16, batch=2, context=48, steps=3, warmup=1,
    calib_samples=2, calib_tokens=32,
)  # fmt: skip


def _e2e_table_text(res) -> str:
    """The CLI's end-to-end table (`lowrank bench speed`) of ``res``, as text."""
    table = _e2e_table(res)
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def _script():
    return load_benchmark_script("decode_e2e")


def test_run_measures_both_sides_and_checks_the_latent_path():
    res = run_e2e(E2ESettings(**SMALL))
    assert res["architecture"]["layers"] == 2 and res["architecture"]["head_dim"] == 128
    assert res["architecture"]["heads"] == res["architecture"]["kv_heads"] == 2
    comp = res["compression"]
    assert comp["method"] == "wsvd" and 0.45 < comp["rho1"] < 0.55 and comp["rho2"] < 0.6
    assert comp["ranks"]["k_proj"]["kind"] == "per_head"
    assert res["check"]["ok"] and res["check"]["max_rel_logit_diff"] < 1e-5  # fp32 on both sides
    assert res["latent_backend"] == "naive"
    progs = res["per_head_programs"]  # MHA per-head latents: the per-head kernel's programs
    assert progs["layers"] == 2 and progs["lower_bound"] <= progs["packed_order"] <= progs["index_order"]
    assert res["check"]["graph_max_rel_logit_diff"] < 1e-5  # graph-mode steps (eager on the CPU)
    (row,) = res["rows"]
    base, lat, eager = row["baseline"], row["latent"], row["latent_eager"]
    assert "baseline_static_graph" not in row  # a CUDA-only reference
    assert base["mode"] == eager["mode"] == "eager" and lat["mode"] == "graph"
    assert lat["graph"] == {"captures": 0, "steps": 1 + 3, "cuda_graph": False}
    assert base["cache_layer_type"] == "DynamicLayer" and lat["cache_layer_type"] == "LatentLayer"
    assert eager["cached_tokens_at_end"] == lat["cached_tokens_at_end"]
    assert base["cached_tokens_at_end"] == lat["cached_tokens_at_end"] == 48 + 1 + 3
    # The latent cache holds about ρ2 of the K/V bytes (plus each token's position).
    assert row["cache_bytes_ratio"] == pytest.approx(lat["cache_bytes"] / base["cache_bytes"])
    assert comp["rho2"] <= row["cache_bytes_ratio"] < comp["rho2"] + 0.1
    for side in (base, lat):
        assert side["decode_tokens_per_s"] == pytest.approx(2 * 3 / side["decode_s"])
        assert side["prefill_s"] > 0 and side["last_tokens_finite"]
    assert row["speedup"] == pytest.approx(lat["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    assert row["speedup_eager"] == pytest.approx(eager["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    line = summary_line(res)
    assert "HF" in line and "latent (naive)" in line  # graph-mode steps ran eagerly on the CPU
    assert f"eager steps {row['speedup_eager']:.2f}x" in line and "StaticCache" not in line
    # The CLI's table shows every timed side: eager and graph-mode latent steps and both speedups.
    table = _e2e_table_text(res)
    for col in ("HF tok/s", "latent eager tok/s", "latent graph tok/s", "speedup eager"):
        assert col in table
    assert "static+graph" not in table  # no reference row was timed on the CPU
    assert f"{row['speedup']:.2f}×" in table and f"{row['speedup_eager']:.2f}×" in table


def test_a_broken_latent_path_fails_the_check_and_reports_no_speedup(monkeypatch, tmp_path):
    real = attention.latent_attention_decode
    # Attention outputs off by half: what a wrong scale or a dropped token does to decode.
    monkeypatch.setattr(attention, "latent_attention_decode", lambda *a, **k: 1.5 * real(*a, **k))
    out = tmp_path / "e2e.json"
    args = ["--tiny", "--device", "cpu", "--dtype", "float32", "--context", "48", "--steps", "2"]
    assert _script().main([*args, "--output", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["check"]["ran"] and not res["check"]["ok"]
    assert res["check"]["max_rel_logit_diff"] > res["check"]["tolerance"]
    assert res["rows"][0]["speedup"] is None
    assert "n/a: the latent check failed" in summary_line(res)
    assert res["command"].startswith("python benchmarks/decode_e2e.py --tiny")


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"arch": "llava-8b"}, r"unknown model alias 'llava-8b'; available: .*llava-next-7b"),
        ({"dtype": "fp8"}, r"unknown dtype 'fp8'; available: float16, bfloat16, float32"),
        ({"batch": 0}, r"batch must be at least 1, got 0"),
        ({"ratio": 1.5}, r"ratio ρ1 must be in \(0, 1\], got 1.5"),
        ({"warmup": -1}, r"warmup must be 0 or more steps, got -1"),
    ],
)
def test_bad_settings(settings, match):
    with pytest.raises(LowRankError, match=match):
        E2ESettings(**{**SMALL, **settings}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_on_a_machine_without_it():
    with pytest.raises(LowRankError, match=r"device 'cuda' was asked for, but this machine has no CUDA GPU"):
        E2ESettings(device="cuda").validate()


def test_shrunk_config():
    config = shrunk_config("qwen2-vl-7b", layers=3, hidden_scale=4)
    text = config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (3, 896, 7)
    assert text.num_key_value_heads == 1 and text.head_dim == 128
    assert config.vision_config.depth == 2 and config.vision_config.hidden_size == 896  # the merger's output
    assert config.vision_config.embed_dim == 1280  # the tower's own width
    with pytest.raises(
        LowRankError, match=r"hidden_scale 16 does not divide qwen2-vl-7b's .*; valid: 1, 2, 4$"
    ):
        shrunk_config("qwen2-vl-7b", hidden_scale=16)


@pytest.mark.parametrize("graph", [False, True])
def test_profile_decode_step_script_on_a_tiny_model(tmp_path, graph):
    """benchmarks/profile_decode_step.py runs both sides on the CPU and writes their operator tables;
    ``--graph`` profiles the latent side's graph-mode steps (eager on the CPU; the static-cache baseline
    needs CUDA, so the CPU baseline stays eager)."""
    script = load_benchmark_script("profile_decode_step")
    out = tmp_path / "profile.json"
    script.main(
        [
            *(["--graph"] if graph else []),
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--steps",
            "1",
            "--top",
            "5",
            "--output",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    for side in ("baseline", "latent"):
        r = res[side]
        assert r["wall_ms_per_step"] > 0 and r["host_issue_ms_one_step"] > 0
        assert len(r["by_host_self"]) == 5 and all(row["calls"] > 0 for row in r["by_host_self"])
        names = {row["name"] for row in r["by_host_self"]}
        assert any(n.startswith("aten::") for n in names)
    assert res["settings"] == {"arch": "llava-next-7b", "batch": 2, "context": 256, "dtype": "float32"}
    assert res["baseline"]["mode"] == "eager"
    assert res["latent"]["mode"] == ("graph" if graph else "eager")


def test_a_quantized_run_decodes_int8_latents_from_integer_weights():
    res = run_e2e(E2ESettings(**SMALL, quant="w8a16-kv8"))
    step = res["compression"]["recipe"]["steps"][1]
    assert res["compression"]["quant"] == step["scheme"] == "w8a16-kv8" and step["methods"] == ["rtn"]
    assert res["check"]["ok"]  # latent decode from int8 latents and integer weights matches rebuilt K/V
    (row,) = res["rows"]
    # int8 latents (plus their scales) in an fp32 model: well under half of rho2's bytes.
    assert row["cache_bytes_ratio"] < 0.5 * res["compression"]["rho2"]


def test_an_unknown_quantization_scheme_is_refused_before_any_work():
    with pytest.raises(LowRankError, match="unknown quantization scheme 'w9'"):
        run_e2e(E2ESettings(**SMALL, quant="w9"))
