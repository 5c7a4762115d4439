"""Compressed checkpoints: a transformers-style directory plus the low-rank structure.

Layout: ``config.json`` (the original config with a ``lowrank_config`` block: format version, resolved
recipe, per-layer/per-head ranks), ``model.safetensors`` (factors and every other weight; shared latents
stored once), the processor/tokenizer files, ``lowrank_report.json``, ``recipe.yaml`` and
``lowrank_manifest.json`` (sha256 of every file, verified at load). No pickle anywhere.

Writes go to a temporary directory beside the target, renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from lowrank_kit.errors import CheckpointError, LowRankError

FORMAT_VERSION = 1
CONFIG_KEY = "lowrank_config"
WEIGHTS = "model.safetensors"
MANIFEST = "lowrank_manifest.json"
REPORT = "lowrank_report.json"


def check_output_available(output: str | Path, *, overwrite: bool) -> Path:
    out = Path(output).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"output {str(out)!r} already exists; choose another --output or pass --overwrite"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {str(out)!r} exists and is not a directory")
    if not out.parent.exists():
        raise CheckpointError(f"the parent directory of output {str(out)!r} does not exist")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool):
    """Yield a temporary directory beside ``target``; rename it to ``target`` only if the block succeeds."""
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise CheckpointError(
                    f"output {str(target)!r} appeared while writing; pass --overwrite to replace it"
                )
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(result, output: str | Path, *, overwrite: bool = False, source: Any = None) -> Path:
    """Write a :class:`~lowrank_kit.pipeline.CompressionResult` to ``output`` atomically."""
    target = check_output_available(output, overwrite=overwrite)
    model = result.model
    with atomic_directory(target, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config[CONFIG_KEY] = {
            "format_version": FORMAT_VERSION,
            "adapter": result.adapter.name,
            "recipe": result.recipe.to_dict(),
            "structure": result.report["ranks"],
            "quantization": result.report.get("quant"),
            "source": None if source is None else str(source),
        }
        _write_json(config_path, config)
        save_model(
            model,
            str(tmp / WEIGHTS),
            metadata={"format": "pt", "lowrank_format_version": str(FORMAT_VERSION)},
        )
        if result.processor is not None:
            result.processor.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(result.recipe.to_yaml(), encoding="utf-8")
        _write_json(tmp / REPORT, result.report)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        _write_json(tmp / MANIFEST, {str(p.relative_to(tmp)): _sha256(p) for p in files})
    return target


def read_lowrank_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory: config.json is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(cfg_path)!r} is corrupt: {err}") from None
    block = config.get(CONFIG_KEY)
    if block is None:
        raise CheckpointError(
            f"{str(path)!r} is not a lowrank_kit checkpoint (no {CONFIG_KEY!r} in config.json)"
        )
    version = block.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by checkpoint format version {version}; this lowrank_kit reads up to "
            f"version {FORMAT_VERSION}: upgrade lowrank_kit"
        )
    return block


def verify_manifest(path: Path) -> None:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no {MANIFEST}; it was not written completely by lowrank_kit"
        )
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {str(f)!r} is corrupt or truncated (checksum mismatch)")


def is_compressed_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        return CONFIG_KEY in json.loads((p / "config.json").read_text())
    except json.JSONDecodeError:
        return False


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a compressed checkpoint; returns a :class:`~lowrank_kit.models.loading.LoadedModel`."""
    import transformers

    from lowrank_kit.models.loading import LoadedModel, adapter_for_config, load_processor
    from lowrank_kit.surgery import build_structure

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    block = read_lowrank_config(p)
    verify_manifest(p)
    config = transformers.AutoConfig.from_pretrained(p)
    adapter = adapter_for_config(config)
    cls = getattr(transformers, adapter.model_class, None)
    if cls is None:
        raise CheckpointError(
            f"{str(p)!r} needs transformers.{adapter.model_class}, which transformers {transformers.__version__} lacks"
        )
    model = cls._from_config(config, dtype=dtype or config.get_text_config().dtype or torch.float32)
    build_structure(model, adapter, block["structure"])
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {str(p / WEIGHTS)!r} is corrupt: {err}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    # Shared latents are saved under one of their names; the others alias the same tensor.
    aliases = {id(t): k for k, t in expected.items() if k in state}
    unresolved = [k for k in missing if id(expected[k]) not in aliases]
    unexpected = [k for k in state if k not in expected]
    if unresolved or unexpected:
        raise CheckpointError(
            f"checkpoint {str(p)!r} does not match its structure: missing {unresolved[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    try:
        processor = load_processor(p)
    except LowRankError:
        processor = None
    return LoadedModel(model=model, processor=processor, adapter=adapter, config=config, spec=str(p), path=p)
