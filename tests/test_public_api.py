"""Pins the public surface: a change here must be deliberate."""

import subprocess
import sys

import pytest

import lowrank_kit

EXPECTED = {
    "CompressionResult",
    "Decomposer",
    "LowRankError",
    "MethodConfig",
    "ModelAdapter",
    "Quantizer",
    "Recipe",
    "__version__",
    "compress",
    "compress_to_directory",
    "enable_latent_decode",
    "get_registry",
    "hookimpl",
    "load",
    "load_model",
    "load_recipe",
    "recipe_from_flags",
    "save_recipe",
}


def test_public_names_are_pinned():
    assert set(lowrank_kit.__all__) == EXPECTED


def test_every_public_name_resolves():
    for name in lowrank_kit.__all__:
        assert getattr(lowrank_kit, name) is not None


def test_import_is_light():
    # `import lowrank_kit` must not pull in triton or transformers (CLI start-up, plugin import time).
    code = "import sys, lowrank_kit; print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["bench", "bench_speed", "evaluate", "testbed", "reference", "main"])
def test_each_cli_module_imports_on_its_own(module):
    # The CLI modules import one another (shared pieces in `common`); any of them imported first (a test, a script,
    # a plugin reusing a table helper) must work, not stop on a half-initialized module.
    code = f"import lowrank_kit.cli.{module} as m; print(m.__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"lowrank_kit.cli.{module}"
