"""Where a latent-enabled model keeps its runtime state: one attribute, read by the attention patch and the
CUDA-graph stepper alike (so neither has to import the other to find it)."""

from __future__ import annotations

from typing import Any

from torch import nn

STATE_ATTR = "_lowrank_latent_decode"


def latent_state(model: nn.Module) -> Any:
    """The :class:`~lowrank_kit.runtime.attention.LatentDecodeState` installed on ``model``, or None."""
    return getattr(model, STATE_ATTR, None)
