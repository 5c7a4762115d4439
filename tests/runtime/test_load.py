"""``lowrank_kit.load(path, latent_decode=True)``: a saved checkpoint decodes from latents."""

import pytest
from checkpoint.ckpt_helpers import samples_for
from runtime_helpers import assert_same_generation, cache_of, greedy, padded_batch, perturb, recipe_for

import lowrank_kit
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.errors import CheckpointError
from lowrank_kit.models.tiny import build_tiny_model
from lowrank_kit.runtime import LatentDecodeError, LatentLayer, latent_decode_enabled
from lowrank_kit.runtime.graph import GRAPH_ATTR


@pytest.mark.parametrize(("method", "scheme"), [("wsvd", None), ("qsvd", "w8a8-kv8")])
def test_load_with_latent_decode(tmp_path, method, scheme):
    model = perturb(build_tiny_model("qwen2_vl"))  # non-zero q/k/v biases, as a trained Qwen2 has
    result = lowrank_kit.compress(
        model, recipe_for("qwen2_vl", method, scheme=scheme), calibration=samples_for(model)
    )
    out = save_compressed(result, tmp_path / "ckpt")
    plain = lowrank_kit.load(out).model
    assert not latent_decode_enabled(plain)
    latent = lowrank_kit.load(out, latent_decode=True).model
    assert latent_decode_enabled(latent)
    inputs = padded_batch(plain)
    ref = greedy(plain, inputs)
    got = greedy(latent, inputs)
    assert all(isinstance(layer, LatentLayer) for layer in cache_of(got).layers)
    assert_same_generation(ref, got)
    # cuda_graph=True: generate's decode steps go through a decode graph (its eager graph mode here).
    graphed = lowrank_kit.load(out, latent_decode=True, cuda_graph=True).model
    got = greedy(graphed, inputs)
    assert getattr(cache_of(got), GRAPH_ATTR).steps == len(got.logits) - 1
    assert_same_generation(ref, got)


def test_load_latent_decode_of_a_model_without_low_rank_kv(tmp_path):
    model = build_tiny_model("llava")
    result = lowrank_kit.compress(
        model, recipe_for("llava", "svd", targets=["q_proj"]), calibration=samples_for(model)
    )
    out = save_compressed(result, tmp_path / "ckpt")
    with pytest.raises(LatentDecodeError, match=r"layer 0 k_proj is a Linear"):
        lowrank_kit.load(out, latent_decode=True)
    with pytest.raises(CheckpointError, match="pass latent_decode=True with it"):
        lowrank_kit.load(out, cuda_graph=True)
