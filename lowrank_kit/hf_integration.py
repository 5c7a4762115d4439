"""transformers integration: ``from_pretrained`` rebuilds the compressed modules of a lowrank_kit checkpoint.

A checkpoint's ``config.json`` carries ``quantization_config: {"quant_method": "lowrank", ...}`` next to
the ``lowrank_config`` block (see :mod:`lowrank_kit.checkpoint`). transformers looks ``quant_method`` up in
its quantizer registry; :func:`register` puts :class:`LowRankConfig` and :class:`LowRankHfQuantizer`
there. While ``from_pretrained`` holds the model skeleton on the meta device, the quantizer verifies the
checksums of the files it is about to read, installs the low-rank (and quantized) modules that the
block describes, and checks that the weights file holds a tensor of the right shape for every one of
their parameters; transformers then loads the factors into them like any other weight.

Registration happens when this module is imported; ``import lowrank_kit`` arranges that through
:mod:`lowrank_kit.hf_hook` without importing transformers itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowrank_kit.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    QUANT_METHOD,
    check_format_version,
    compressed_module_types,
    install_structure,
    lowrank_block,
    verify_manifest,
)
from lowrank_kit.errors import CheckpointError, LowRankError

log = logging.getLogger(__name__)

# Directories whose manifest the caller (lowrank_kit.load) has verified already, so that loading does not
# hash every file twice.
_verified: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "lowrank_verified", default=frozenset()
)


@contextlib.contextmanager
def manifest_already_verified(directory: Path) -> Iterator[None]:
    token = _verified.set(_verified.get() | {str(Path(directory).resolve())})
    try:
        yield
    finally:
        _verified.reset(token)


class LowRankConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a lowrank_kit checkpoint: a pointer to its ``lowrank_config`` block.

    The block itself (recipe, ranks, quantization scheme) stays at the top level of ``config.json``;
    here only the method name and the format version, so that a newer checkpoint is refused before
    anything is built.
    """

    def __init__(self, format_version: int | None = None, quant_method: str = QUANT_METHOD, **unknown: Any):
        if quant_method != QUANT_METHOD:
            raise CheckpointError(
                f"LowRankConfig got quant_method {quant_method!r}; expected {QUANT_METHOD!r}"
            )
        version = FORMAT_VERSION if format_version is None else format_version
        check_format_version(version, "this checkpoint")
        if unknown:
            raise CheckpointError(
                f"the lowrank quantization_config has unknown fields {sorted(unknown)} for format version "
                f"{version}; the checkpoint was edited or written by another tool"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = version


def _checkpoint_keys(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the safetensors files (headers only; no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(
                f"lowrank_kit checkpoints store weights in safetensors only, found {str(file)!r}"
            )
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint file {str(file)!r} is corrupt or truncated ({err})") from None
    return shapes


def _read_tensor(files: list[str], key: str) -> torch.Tensor:
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():  # noqa: SIM118
                return f.get_tensor(key)
    raise CheckpointError(f"no tensor {key!r} in {files}")


def _persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for b_name, buf in mod.named_buffers(recurse=False):
            if b_name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{b_name}" if mod_name else b_name), buf


def compressed_parameters(model: nn.Module) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Every parameter and stored buffer (quantized integers, scales, Hadamard factors) of the installed
    low-rank/quantized modules with all the names it goes by.

    A tensor shared between projections (QSVD's latent) has several names; safetensors stores it
    under one of them.
    """
    kinds = compressed_module_types()
    out: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, kinds):
            continue
        tensors = [*module.named_parameters(remove_duplicate=False), *_persistent_buffers(module)]
        for p_name, param in tensors:
            full = f"{mod_name}.{p_name}"
            entry = out.setdefault(id(param), (param, []))
            if full not in entry[1]:
                entry[1].append(full)
    return out


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer of ``model`` by its full name."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        return module._parameters[leaf]
    return module.get_buffer(leaf)


class LowRankHfQuantizer(HfQuantizer):
    """Installs a lowrank_kit checkpoint's compressed modules before transformers loads the weights."""

    # Nothing is compressed at load time: only a checkpoint written by lowrank_kit can be loaded.
    requires_calibration = True

    def __init__(self, quantization_config: LowRankConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise CheckpointError(
                "quant_method 'lowrank' loads checkpoints written by lowrank_kit; to compress a model, run "
                "`lowrank compress` or lowrank_kit.compress()"
            )
        super().__init__(quantization_config, **kwargs)
        self._files: list[str] = []
        self._aliased: list[tuple[list[str], str]] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        files = [str(f) for f in (kwargs.get("checkpoint_files") or [])]
        if not files:
            raise CheckpointError(
                f"{model.config.name_or_path!r} is a lowrank_kit checkpoint without weight files"
            )
        self._files = files
        block = lowrank_block(model.config, str(model.config.name_or_path))
        directory = Path(files[0]).parent
        if str(directory.resolve()) not in _verified.get():
            manifest = directory / MANIFEST
            if manifest.is_file():
                verify_manifest(directory, only=["config.json", *(Path(f).name for f in files)])
            else:
                # A directory written by transformers' save_pretrained (or a hub snapshot that did not
                # fetch the manifest): the file headers are still checked below.
                log.warning(
                    "%s has no %s; the weight files' checksums cannot be verified", directory, MANIFEST
                )
        install_structure(model, block)
        self._check_weights(model)
        return model

    def _check_weights(self, model: nn.Module) -> None:
        stored = _checkpoint_keys(self._files)
        ignore: set[str] = set()
        self._aliased = []
        for param, names in compressed_parameters(model).values():
            present = [n for n in names if n in stored]
            if not present:
                raise CheckpointError(
                    f"checkpoint {self._files[0]!r} lacks the tensor {names[0]!r} that its lowrank_config "
                    "structure needs; the weights and config.json do not belong together"
                )
            shape = stored[present[0]]
            if shape != tuple(param.shape):
                raise CheckpointError(
                    f"checkpoint tensor {present[0]!r} has shape {list(shape)}, but its lowrank_config "
                    f"structure needs {list(param.shape)}; the weights and config.json do not belong together"
                )
            if len(names) > len(present):
                ignore.update(re.escape(n) + "$" for n in names if n not in stored)
                self._aliased.append((names, present[0]))
        if ignore:
            # The other names of a shared parameter are not in the file by design, not missing.
            existing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = existing | ignore

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # transformers treats the unsaved names of a shared parameter as missing and re-initializes them,
        # which overwrites the one shared tensor; it is read again from the file here.
        for names, stored in self._aliased:
            param = _tensor(model, stored)
            value = _read_tensor(self._files, stored)
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
            for name in names:
                if _tensor(model, name) is not param:
                    raise CheckpointError(
                        f"{name!r} no longer shares its tensor with {stored!r} after loading; "
                        "this transformers version loads shared low-rank latents differently"
                    )
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``quant_method: "lowrank"`` known to transformers (idempotent)."""
    for mapping, ours, kind in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, LowRankConfig, "config"),
        (AUTO_QUANTIZER_MAPPING, LowRankHfQuantizer, "quantizer"),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is not None and current is not ours:
            raise LowRankError(
                f"transformers already has a quantization {kind} {current.__module__}.{current.__qualname__} "
                f"for quant_method {QUANT_METHOD!r}; uninstall the package that registers it"
            )
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowRankConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowRankHfQuantizer)


register()
