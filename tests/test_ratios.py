"""Which K/V pairs cache one latent: the rule that ρ2 (lowrank_kit.ratios) and the quantized cache size
(lowrank_kit.quant.report) both count by."""

import torch
from torch import nn

from lowrank_kit.modules import DenseFactors, JointFactors, LowRankLinear, build_joint_modules
from lowrank_kit.ratios import shares_latent


def _joint_kv(seed: int, n: int = 10, r: int = 3) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    f = JointFactors(
        A={"k_proj": torch.randn(4, r, generator=g), "v_proj": torch.randn(4, r, generator=g)},
        B=torch.randn(r, n, generator=g),
    )
    return build_joint_modules(f, {"k_proj": None, "v_proj": None}, torch.float32, "cpu")


def test_k_and_v_share_a_latent_only_when_it_is_one_object():
    one, other = _joint_kv(0), _joint_kv(1)
    assert shares_latent(one["k_proj"], one["v_proj"])
    # Joint projections, but of two latents (say, of two layers): each is cached.
    assert not shares_latent(one["k_proj"], other["v_proj"])


def test_separate_projections_never_share():
    dense = nn.Linear(10, 4)
    low_rank = LowRankLinear.from_factors(
        DenseFactors(torch.randn(4, 2), torch.randn(2, 10)), None, torch.float32, "cpu"
    )
    joint = _joint_kv(0)["k_proj"]
    for k, v in [(dense, dense), (low_rank, low_rank), (joint, dense), (dense, joint), (low_rank, joint)]:
        assert not shares_latent(k, v)
