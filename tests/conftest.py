"""Shared fixtures: tiny models of any family, and a registry that starts fresh for one test."""

import os

import pytest
import torch

# Triton decides between compiling and interpreting a kernel when the kernel is decorated, and any test
# module may be the first to import one; so the choice is made here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
