"""RoPE of one decoder layer as the latent decode path rebuilds it: ``inv_freq`` plus an attention factor.

The frequencies are computed the way transformers computes them for the config: the plain
``theta^(-2i/d)`` table for ``default`` and ``ROPE_INIT_FUNCTIONS[rope_type](config)`` for the scaled
types, which returns the scaled table and the factor that multiplies cos and sin (yarn's mscale).
Only rope types whose table does not depend on the sequence length are accepted: ``dynamic`` and
``longrope`` rescale while generating, which a cache of positions cannot follow.

Layer-dependent RoPE (Molmo2's ``rope_scaling_layers``: the scaled table on the listed layers, the plain
table of the same theta elsewhere) is read from the adapter's :class:`~lowrank_kit.models.base.RopeInfo`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lowrank_kit.kernels.latent_attention.layout import RopeSpec
from lowrank_kit.models.base import AttentionInfo
from lowrank_kit.runtime.errors import LatentDecodeError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_for_layer(info: AttentionInfo, layer: int) -> str:
    params = info.rope.parameters
    rope_type = str(params.get("rope_type", "default"))
    scaled_layers = params.get("rope_scaling_layers")
    if scaled_layers is not None and layer not in {int(i) for i in scaled_layers}:
        return "default"
    return rope_type


def rope_spec(text_config: Any, info: AttentionInfo, layer: int) -> RopeSpec:
    """The :class:`RopeSpec` (fp32 on the CPU) of decoder layer ``layer``."""
    rope_type = rope_type_for_layer(info, layer)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise LatentDecodeError(
            f"latent decode cannot rebuild rope_type {rope_type!r} (layer {layer}): its frequencies change "
            f"with the sequence length or are not a plain table; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    params = info.rope.parameters
    partial = float(params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise LatentDecodeError(
            f"latent decode rotates the whole head; this config has partial_rotary_factor {partial} "
            "(only 1.0 is supported)"
        )
    d = info.head_dim
    if rope_type == "default":
        inv_freq = 1.0 / (info.rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        factor = 1.0
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](text_config, torch.device("cpu"))
        inv_freq = inv_freq.to(torch.float32)
    if inv_freq.numel() != d // 2:
        raise LatentDecodeError(
            f"rope_type {rope_type!r} gives {inv_freq.numel()} frequencies for head_dim {d} (layer {layer}); "
            f"expected {d // 2}"
        )
    try:
        return RopeSpec(inv_freq.contiguous(), float(factor), info.rope.mrope_section)
    except ValueError as err:
        raise LatentDecodeError(f"layer {layer}: {err}") from None
