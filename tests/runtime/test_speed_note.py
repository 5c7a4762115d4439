"""enable_latent_decode says when the layout it serves decodes slower than SDPA on the full cache (the
measured table of docs/kernel.md), and says nothing for the layout the kernel speeds up."""

import logging

import pytest
from runtime_helpers import compress_model, compressed_tiny, mha_config, model_from_config

from lowrank_kit.models.tiny import build_tiny_model
from lowrank_kit.runtime import enable_latent_decode
from lowrank_kit.runtime.attention import STATE_ATTR


def note_of(model, caplog):
    with caplog.at_level(logging.WARNING, logger="lowrank_kit.runtime.attention"):
        enable_latent_decode(model, backend="naive")
    note = getattr(model, STATE_ATTR).speed_note
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("latent decode:")]
    assert logged == ([f"latent decode: {note}"] if note else [])
    return note


def mha_model(method: str, ratio: float):
    model = model_from_config(mha_config(build_tiny_model("llama").config))
    return compress_model(model, "llama", method, ratio)


def test_per_head_latents_of_an_mha_model_at_half_the_cache_say_nothing(caplog):
    assert note_of(mha_model("wsvd", 0.4), caplog) is None


@pytest.mark.parametrize(
    "model,expected",
    [
        (lambda: mha_model("svdllm", 0.5), "one shared latent per projection"),
        (lambda: mha_model("qsvd", 0.5), "one joint latent (qsvd)"),
        (
            lambda: compressed_tiny("llama", "wsvd", 0.5),
            "grouped-query attention (4 query heads over 2 KV heads)",
        ),
        (lambda: mha_model("wsvd", 0.95), "at rho2 0.7-0.9 the latent kernel measured 0.55-0.88x"),
    ],
)
def test_slower_layouts_are_named(caplog, model, expected):
    note = note_of(model(), caplog)
    assert note is not None and expected in note
