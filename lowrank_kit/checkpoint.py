"""Compressed checkpoints: a transformers-style directory plus the low-rank structure.

Layout:

- ``config.json``: the original config with ``"model_type": "lowrank_kit"`` (so that transformers
  without lowrank_kit refuses it instead of initialising the projections at random; see
  :mod:`lowrank_kit.hf_config`) and a ``lowrank_kit_guard`` entry that stops the model's own class too,
  plus ``lowrank_config`` (format version, the model's own
  ``base_model_type``, adapter, resolved recipe, per-layer/per-head ranks under ``structure``, the
  quantization scheme and per-module quantized layout) and
  ``quantization_config: {"quant_method": "lowrank", "format_version": N}``, through which
  ``from_pretrained`` finds :mod:`lowrank_kit.hf_integration`;
- ``model.safetensors``: factors, quantized weights with their scales, and every other weight (a
  shared latent is stored once); above ``max_shard_size`` (default 50GB, as transformers') the weights
  are split into ``model-0000i-of-0000N.safetensors`` shards with transformers' index file
  ``model.safetensors.index.json``;
- the processor/tokenizer files and ``generation_config.json``;
- ``lowrank_report.json`` (what was done, ρ1/ρ2, sizes on disk), ``recipe.yaml``;
- ``lowrank_manifest.json``: the sha256 of every other file, verified at load.

Format versions: 1 kept the model's own ``model_type`` (still read); 2 writes ``lowrank_kit``.

No pickle anywhere. Writes go to a hidden temporary directory beside the target and are renamed into
place only when every file is written and synced; a failure leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, save_model
from torch import nn

from lowrank_kit.errors import CheckpointError
from lowrank_kit.hf_config import BASE_TYPE_KEY, CONFIG_KEY, GUARD_KEY, MODEL_TYPE, guard_entry
from lowrank_kit.modules import LOW_RANK_MODULES
from lowrank_kit.paths import sha256_file
from lowrank_kit.placement import parse_memory
from lowrank_kit.quant.modules import QUANT_MODULES
from lowrank_kit.quant.structure import install_quantized
from lowrank_kit.quant.structure import quantized_structure as describe_quantized
from lowrank_kit.registry import adapter_for_config
from lowrank_kit.surgery import build_structure

FORMAT_VERSION = 2
QUANT_METHOD = "lowrank"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
MANIFEST = "lowrank_manifest.json"
REPORT = "lowrank_report.json"
RECIPE = "recipe.yaml"


# -- safe writes -------------------------------------------------------------------------------------
def check_output_available(output: str | Path, *, overwrite: bool) -> Path:
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {str(out)!r} exists and is not a directory; choose another --output")
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"output {str(out)!r} already exists; choose another --output or pass --overwrite"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(
                    f"cannot create output {str(out)!r}: {str(parent)!r} is a file, not a directory"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CheckpointError(
                    f"cannot create output {str(out)!r}: directory {str(parent)!r} is not writable"
                )
            break
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


_SIDE_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _recover_stale(target: Path) -> None:
    """Clean up after a writer of ``target`` that was killed: drop its partial directory, and put back
    the previous checkpoint if the kill fell between moving it aside and moving the new one in."""
    for side in target.parent.iterdir():
        m = _SIDE_DIR.match(side.name)
        if m is None or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not target.exists():
            os.replace(side, target)
        else:
            shutil.rmtree(side, ignore_errors=True)


def _side_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(err: OSError, target: Path) -> CheckpointError:
    if err.errno == errno.ENOSPC:
        what = "no space left on the device"
    elif err.errno == errno.EDQUOT:
        what = "the disk quota is exceeded"
    else:
        what = err.strerror or str(err)
    return CheckpointError(
        f"cannot write checkpoint {str(target)!r}: {what} ({err.filename or 'while writing'}); nothing was "
        "written and any existing checkpoint there is untouched; free space or choose another --output"
    )


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` only if the block succeeds.

    On any failure (an exception, a full disk, Ctrl-C) the temporary directory is removed and ``target``
    is left as it was. A process killed outright cannot clean up; the next write to the same target
    removes what it left (and restores a previous checkpoint it had moved aside).
    """
    target = Path(target)
    made = _make_parents(target)
    _recover_stale(target)
    tmp = _side_path(target, "partial")
    try:
        tmp.mkdir()
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if target.exists():
            if not overwrite:
                raise CheckpointError(
                    f"output {str(target)!r} appeared while writing; pass --overwrite to replace it"
                )
            old = _side_path(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise _write_error(err, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise


def _make_parents(target: Path) -> list[Path]:
    """Create the missing parent directories of ``target``; return them, deepest first."""
    missing: list[Path] = []
    for parent in target.parents:
        if parent.exists():
            break
        missing.append(parent)
    made: list[Path] = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
    except OSError as err:
        _remove_made(list(reversed(made)))
        raise _write_error(err, target) from None
    return list(reversed(made))


def _remove_made(made: list[Path]) -> None:
    """Remove directories created by ``_make_parents`` (deepest first) if they are still empty."""
    for p in made:
        try:
            p.rmdir()
        except OSError:
            break


# -- writing -----------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, each shared tensor counted once (what safetensors would store)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model).values())


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once (a tied or shared tensor under the first of its names in
    sorted order), in state-dict order."""
    groups: dict[tuple, list[str]] = {}
    tensors: dict[tuple, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if t.numel() == 0:  # empty tensors share address 0 without being one tensor
            key: tuple = ("empty", name)
        else:
            storage = t.untyped_storage().data_ptr()
            key = (t.device, storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
        tensors[key] = t
    return {min(names): tensors[key] for key, names in groups.items()}


def _write_weights(model: nn.Module, directory: Path, max_shard_size: int) -> list[Path]:
    """The weights as one ``model.safetensors``, or as shards of at most ``max_shard_size`` bytes each
    (a tensor larger than that gets a shard of its own) with transformers' index file."""
    state = _unique_tensors(model)
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    total = sum(sizes.values())  # state_bytes(model)
    if total <= max_shard_size:
        # One metadata entry only: safetensors writes the metadata map in hash order, so a second key
        # would make two identical runs write different bytes (the format version is in config.json).
        save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
        return [directory / WEIGHTS]
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    count = len(shards)
    files, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file = directory / f"model-{i:05d}-of-{count:05d}.safetensors"
        save_file({n: state[n].contiguous().cpu() for n in names}, str(file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update({n: file.name for n in names})
    _write_json(directory / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def weight_files(directory: Path) -> list[Path]:
    """A checkpoint's safetensors files: ``model.safetensors`` or the shards its index names."""
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{str(index)!r} is not a safetensors index ({err})") from None
        return [directory / n for n in names]
    return [directory / WEIGHTS]


def save_compressed(
    result,
    output: str | Path,
    *,
    overwrite: bool = False,
    source: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a :class:`~lowrank_kit.pipeline.CompressionResult` to ``output`` atomically.

    Adds ``disk_bytes`` (the weights files), ``checkpoint_bytes`` (every file) and ``disk_ratio``
    (``disk_bytes`` over ``original_weight_bytes``, the uncompressed model's weights in the same dtype)
    to ``result.report``. ``max_shard_size`` (bytes or e.g. ``"5GB"``) splits larger weights into shards.
    """
    shard_bytes = parse_memory(max_shard_size, "--max-shard-size")
    target = check_output_available(output, overwrite=overwrite)
    model = result.model
    report = result.report
    with atomic_directory(target, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config[CONFIG_KEY] = {
            "format_version": FORMAT_VERSION,
            BASE_TYPE_KEY: config["model_type"],
            "adapter": result.adapter.name,
            "recipe": result.recipe.to_dict(),
            "structure": report["ranks"],
            "quantization": report.get("quant"),
            "quantized_modules": quantized_structure(model),
            "source": None if source is None else str(source),
        }
        config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
        config[GUARD_KEY] = guard_entry(config["model_type"])
        config["model_type"] = MODEL_TYPE
        _write_json(config_path, config)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        weights = _write_weights(model, tmp, shard_bytes)
        if result.processor is not None:
            result.processor.save_pretrained(tmp)
        (tmp / RECIPE).write_text(result.recipe.to_yaml(), encoding="utf-8")
        report["disk_bytes"] = sum(f.stat().st_size for f in weights)
        report["weight_files"] = len(weights)
        original = report.get("original_weight_bytes")
        report["disk_ratio"] = report["disk_bytes"] / original if original else None
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        report["checkpoint_bytes"] = sum(p.stat().st_size for p in files)
        _write_json(tmp / REPORT, report)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        _write_json(tmp / MANIFEST, {str(p.relative_to(tmp)): sha256_file(p) for p in files})
    return target


# -- reading -----------------------------------------------------------------------------------------
def check_format_version(version: Any, where: str) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{where} has an invalid lowrank format_version {version!r}; expected an integer"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} was written by checkpoint format version {version}; this lowrank_kit reads up to "
            f"version {FORMAT_VERSION}: upgrade lowrank_kit"
        )
    return version


def _check_block(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise CheckpointError(f"{where} has a {CONFIG_KEY!r} entry that is not a mapping")
    check_format_version(block.get("format_version"), where)
    if not isinstance(block.get("structure"), dict):
        raise CheckpointError(f"{where}: {CONFIG_KEY} has no 'structure' mapping")
    return block


def read_lowrank_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint directory: config.json is missing; pass the directory that "
            "`lowrank compress` wrote"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(cfg_path)!r} is corrupt or truncated (not valid JSON: {err})") from None
    if not isinstance(config, dict) or CONFIG_KEY not in config:
        raise CheckpointError(
            f"{str(path)!r} is not a lowrank_kit checkpoint (no {CONFIG_KEY!r} in config.json); load an "
            "uncompressed model with lowrank_kit.load_model"
        )
    return _check_block(config[CONFIG_KEY], repr(str(path)))


def lowrank_block(config: Any, where: str) -> dict[str, Any]:
    """The ``lowrank_config`` block of a transformers config (transformers keeps unknown keys as attributes)."""
    block = getattr(config, CONFIG_KEY, None)
    if block is None:
        raise CheckpointError(
            f"{where!r} declares quant_method 'lowrank' but its config.json has no {CONFIG_KEY!r} block"
        )
    return _check_block(block, repr(where))


def verify_manifest(path: Path, only: list[str] | None = None) -> None:
    """Check the sha256 of the files in the manifest (``only``: just these of them)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no {MANIFEST}; it was not written completely by lowrank_kit"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"checkpoint file {str(manifest_path)!r} is corrupt or truncated ({err})"
        ) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint file {str(manifest_path)!r} is corrupt (not a mapping)")
    for rel in only if only is not None else sorted(manifest):
        f = path / rel
        if rel not in manifest:
            raise CheckpointError(f"checkpoint file {str(f)!r} is not listed in {MANIFEST}")
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
        if sha256_file(f) != manifest[rel]:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt or truncated (checksum mismatch)")


def damaged_safetensors(directory: str | Path) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file in ``directory`` whose header or length does not check out."""

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            return file, str(err)
    return None


def is_compressed_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        return CONFIG_KEY in json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# -- structure ---------------------------------------------------------------------------------------
def compressed_module_types() -> tuple[type[nn.Module], ...]:
    return (*LOW_RANK_MODULES, *QUANT_MODULES)


def quantized_structure(model: nn.Module) -> dict[str, Any]:
    """Per-module layout of quantized, rotated and K/V-marked modules (empty for a float model); see
    :func:`lowrank_kit.quant.structure.quantized_structure`."""
    return describe_quantized(model)


def install_structure(model: nn.Module, block: dict[str, Any]) -> nn.Module:
    """Replace the model's projections by empty modules of the layout ``block`` describes: the low-rank
    structure first, then the quantized modules inside and around it."""
    adapter = adapter_for_config(model.config)
    try:
        build_structure(model, adapter, block["structure"])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"the {CONFIG_KEY} structure of this checkpoint is invalid: {err}") from None
    try:
        install_quantized(model, block.get("quantized_modules") or {})
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(
            f"the {CONFIG_KEY} quantized_modules of this checkpoint are invalid: {err}"
        ) from None
    return model
