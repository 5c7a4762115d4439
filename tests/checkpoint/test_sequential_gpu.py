"""Layer-by-layer compression on a CUDA GPU: layers really move between host and device, and the
result matches the whole model compressed on the GPU."""

import pytest
import torch
from ckpt_helpers import samples_for

import lowrank_kit
from lowrank_kit.models.tiny import build_tiny_model, family_available
from lowrank_kit.placement import parse_placement

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to stream layers to"),
]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "family", [f for f in ("llava", "qwen2_vl", "molmo2", "qwen3") if family_available(f)]
)
@pytest.mark.parametrize("method", ["wsvd", "svdllm"])
@pytest.mark.parametrize("device_map", ["sequential", "auto"])
def test_streamed_compression_on_the_gpu_matches_the_in_memory_one(family, method, device_map):
    recipe = lowrank_kit.recipe_from_flags(model=family, method=method, ratio=0.6)
    reference = build_tiny_model(family, seed=0).cuda()
    want = lowrank_kit.compress(reference, recipe, calibration=samples_for(reference, n=3)).model.state_dict()

    model = build_tiny_model(family, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lowrank_kit.compress(
        model, recipe, calibration=samples_for(model, n=3), placement=parse_placement(device_map)
    )
    placement = result.report["placement"]
    assert placement["execution_device"] == "cuda:0"
    if device_map == "sequential":  # every layer crossed to the GPU once per pass
        assert placement["resident_layers"] == 0 and placement["layer_onloads"] >= placement["layers"]
    else:  # a tiny model fits: every layer stays resident
        assert placement["resident_layers"] == placement["layers"] and placement["layer_onloads"] == 0
    got = result.model.state_dict()
    assert all(t.device.type == "cpu" for t in got.values())  # the result is in host memory
    assert got.keys() == want.keys()
    for key in got:
        assert rel(got[key], want[key].cpu()) < 1e-4, key
        if key in before:  # tensors the compression did not replace are untouched
            assert torch.equal(got[key], before[key]), key
