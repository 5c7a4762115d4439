"""Module surgery on tiny models of every family: exactness at full rank, ratio counts, generation."""

import pytest
import torch

from lowrank_kit.errors import LowRankError
from lowrank_kit.methods.allocation import dense_rank
from lowrank_kit.methods.base import DecomposeJob
from lowrank_kit.methods.svd import SVDDecomposer
from lowrank_kit.models.tiny import TINY_FAMILIES, build_tiny_model, family_available, tiny_inputs
from lowrank_kit.pipeline import compress, count_parameters
from lowrank_kit.recipe import recipe_from_flags
from lowrank_kit.registry import adapter_for_config
from lowrank_kit.surgery import apply_plan, build_structure, describe_structure

FAMILIES = [
    pytest.param(
        f,
        marks=pytest.mark.skipif(
            not family_available(f), reason=f"this transformers lacks the {f} model class"
        ),
    )
    for f in TINY_FAMILIES
]
# fp32 forward of a 2-layer model; an exact refactorization differs only by rounding (~1e-6).
FULL_RANK_RTOL = 1e-4


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_svd_reproduces_logits(family):
    model = build_tiny_model(family)
    adapter = adapter_for_config(model.config)
    info = adapter.info(model)
    inputs = tiny_inputs(model)
    ref = _logits(model, inputs)
    full = {t: min(info.out_features(t), info.hidden_size) for t in ("q_proj", "k_proj", "v_proj")}
    job = DecomposeJob(model, adapter, info, ("q_proj", "k_proj", "v_proj"), ratios={}, ranks=full)
    apply_plan(model, adapter, SVDDecomposer().decompose(job))
    assert type(adapter.get_projection(model, 0, "k_proj")).__name__ == "LowRankLinear"
    assert _rel(_logits(model, inputs), ref) < FULL_RANK_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_ratios_match_an_independent_count_and_generation_works(family):
    model = build_tiny_model(family)
    adapter = adapter_for_config(model.config)
    info = adapter.info(model)
    before = count_parameters(model)
    result = compress(model, recipe_from_flags(model=family, method="svd", ratio=0.6))
    # Independent count: parameters removed from the model, and ranks from the ρ1 formula.
    replaced = (
        sum(info.out_features(t) * info.hidden_size for t in ("q_proj", "k_proj", "v_proj")) * info.num_layers
    )
    removed = before - count_parameters(model)
    assert result.report["rho1"] == pytest.approx((replaced - removed) / replaced, abs=1e-12)
    ranks = {t: dense_rank(info.out_features(t), info.hidden_size, 0.6) for t in ("k_proj", "v_proj")}
    expected_rho2 = (ranks["k_proj"] + ranks["v_proj"]) / (2 * info.num_kv_heads * info.head_dim)
    assert result.report["rho2"] == pytest.approx(expected_rho2, abs=1e-12)
    assert abs(result.report["rho1"] - 0.6) < 0.1  # tiny matrices: one rank step is a large fraction
    out = model.generate(**tiny_inputs(model), max_new_tokens=4, do_sample=False)
    assert out.shape[-1] >= 4


def test_structure_round_trips_into_empty_modules():
    model = build_tiny_model("llava")
    adapter = adapter_for_config(model.config)
    compress(model, recipe_from_flags(model="llava", method="svd", ratio=0.5))
    structure = describe_structure(model, adapter)
    fresh = build_tiny_model("llava")
    build_structure(fresh, adapter, structure)
    assert describe_structure(fresh, adapter) == structure
    fresh.load_state_dict(model.state_dict())
    inputs = tiny_inputs(model)
    assert torch.equal(_logits(fresh, inputs), _logits(model, inputs))


def test_dtype_is_preserved():
    model = build_tiny_model("llava", dtype=torch.bfloat16)
    compress(model, recipe_from_flags(model="llava", method="svd", ratio=0.5))
    adapter = adapter_for_config(model.config)
    mod = adapter.get_projection(model, 0, "q_proj")
    assert mod.up.weight.dtype == torch.bfloat16 and mod.down.weight.dtype == torch.bfloat16


def test_decomposing_twice_is_refused():
    model = build_tiny_model("llava")
    compress(model, recipe_from_flags(model="llava", method="svd", ratio=0.5))
    with pytest.raises(LowRankError, match="already a LowRankLinear; decompose an uncompressed model"):
        compress(model, recipe_from_flags(model="llava", method="svd", ratio=0.5))
