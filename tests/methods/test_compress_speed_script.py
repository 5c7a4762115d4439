"""The compression-speed benchmark script runs end to end on a tiny model and writes its JSON."""

import json

import torch
from script_helpers import load_benchmark_script

from lowrank_kit.models.tiny import build_tiny_model


def _script():
    return load_benchmark_script("compress_speed")


def test_llava_samples_have_one_images_tokens_and_a_labelled_answer():
    model = build_tiny_model("llava")
    samples = _script().llava_samples(model, count=2, text_tokens=12, answer_tokens=3, seed=0)
    ids, labels = samples[0].inputs["input_ids"], samples[0].labels
    assert int((ids == model.config.image_token_id).sum()) == 4  # (8 px / 4 px patches)², CLS dropped
    assert ids.shape[-1] == 1 + 12 + 4
    assert torch.equal(labels[0, -3:], ids[0, -3:]) and bool((labels[0, :-3] == -100).all())
    with torch.no_grad():
        assert torch.isfinite(model(**samples[0].inputs).logits).all()


def test_smoke_run_writes_stage_times_and_ratios(tmp_path):
    out = tmp_path / "speed.json"
    argv = [
        "--tiny",
        "llava",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--samples",
        "2",
        "--output",
        str(out),
    ]
    _script().main([*argv, "--params", '{"finetune": true, "ft_steps": 3}'])
    result = json.loads(out.read_text())
    assert [s["stage"] for s in result["stages"]] == [
        "calibration: activations",
        "wsvd: whitened per-head SVD",
        "calibration: gradients",
        "wsvd: local fine-tuning",
        "module surgery",
    ]
    assert abs(result["rho1"] - 0.5) < 0.02
    assert result["compressed_forward_finite"] is True
    assert result["params"]["ft_steps"] == 3
