"""The error of the latent decode runtime."""

from __future__ import annotations

from lowrank_kit.errors import LowRankError


class LatentDecodeError(LowRankError):
    """A model, cache or input that the latent decode path cannot run, with what would make it run."""
