"""Shared fixtures: tiny models of any family, and a registry that starts fresh for one test."""

import pytest

from lowrank_kit.registry import reset_registry


@pytest.fixture
def tiny_model():
    """``tiny_model(family, seed=0, dtype=torch.float32)``: a fresh tiny model (tests may mutate it)."""
    from lowrank_kit.models.tiny import build_tiny_model

    return build_tiny_model


@pytest.fixture
def fresh_registry():
    """The registry rebuilt before the test and forgotten after it, so added plugins do not leak."""
    from lowrank_kit.registry import get_registry

    reset_registry()
    yield get_registry()
    reset_registry()
