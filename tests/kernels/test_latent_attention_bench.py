"""The decode-attention benchmark's shapes: read from the presets, and equal to its built-in table."""

import pytest

from lowrank_kit.errors import UnknownNameError
from lowrank_kit.kernels.latent_attention.bench import MODELS, attention_shape


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
    import sys

    import torch

    import lowrank_kit.kernels.latent_attention.bench as bench

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        bench, "run", lambda args, models, rhos, say: seen.update(args=args, models=models, rhos=rhos)
    )
    argv = ["attention_decode.py", "run", "--out", "x.json", "--grid", "full", "--models", "qwen2-vl-7b"]
    monkeypatch.setattr(sys, "argv", [*argv, "--rhos", "0.5", "0.7"])
    bench.main()
    assert seen["models"] == {"qwen2-vl-7b": MODELS["qwen2-vl-7b"]} and seen["rhos"] == (0.5, 0.7)
    assert seen["args"].grid == "full" and seen["args"].batches == [1, 4, 16, 64]
    monkeypatch.setattr(sys, "argv", [*argv[:3], "x.json"])
    bench.main()
    assert list(seen["models"]) == list(MODELS)  # every shape by default
    monkeypatch.setattr(sys, "argv", [*argv[:5], "--models", "llava"])
    with pytest.raises(SystemExit):  # argparse: invalid choice, listing the valid ones
        bench.main()
