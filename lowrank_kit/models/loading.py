"""From ``--model`` to a loaded model: aliases, local directories, hub ids and the testbed.

``--model`` accepts an alias (``lowrank models`` lists them), a local directory written by
``save_pretrained``, a hub id ``org/name`` (from the local Hugging Face cache, or downloaded when the
hub is reachable), or ``testbed`` / ``testbed-tiny`` (built locally on first use). The family is then
recognised from the config's ``model_type`` / ``architectures`` through the registered adapters; an
unknown architecture is an error listing what is supported, never a guess.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from lowrank_kit.errors import ModelLoadError, UnknownNameError
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.families import MOLMO_REMOTE_REASON
from lowrank_kit.models.presets import PRESETS, build_random_model, preset_config
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

TESTBEDS = {"testbed": "small", "testbed-tiny": "tiny"}
# Families that are recognised (so the error can say why) but refused.
REFUSED = {"molmo": MOLMO_REMOTE_REASON}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")

SpecKind = Literal["alias", "local", "hub", "testbed"]


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` resolved to: ``source`` is a local directory or a hub id."""

    spec: str
    kind: SpecKind
    source: str
    alias: str | None = None
    family: str | None = None

    @property
    def local_path(self) -> Path | None:
        return Path(self.source) if self.kind in ("local", "testbed") else None


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    adapter: ModelAdapter
    config: Any
    spec: str
    path: Path | None


def _first_line(err: BaseException) -> str:
    """``Type: first sentence`` of an exception from transformers, whose messages run to paragraphs."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else ""
    end = line.find(". ")
    return f"{type(err).__name__}: {line[: end + 1] if end > 0 else line[:200]}"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.endswith("/") or spec.count("/") > 1


def resolve_model(spec: str) -> ModelSpec:
    """Resolve ``--model``: an alias, a testbed, an existing local directory, or a hub id ``org/name``."""
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"model must be a non-empty name, got {spec!r}")
    if spec in TESTBEDS:
        from lowrank_kit.testbed import ensure_testbed

        return ModelSpec(spec, "testbed", str(Path(ensure_testbed(TESTBEDS[spec]))))
    if spec in PRESETS:
        preset = PRESETS[spec]
        return ModelSpec(spec, "alias", preset.hub_id, alias=spec, family=preset.family)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {spec!r} is a file; pass the directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {spec!r} has no config.json; pass a directory written by save_pretrained"
            )
        return ModelSpec(spec, "local", str(path.resolve()))
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path {spec!r} does not exist")
    if _HUB_ID.fullmatch(spec):
        return ModelSpec(spec, "hub", spec)
    names = ", ".join([*PRESETS, *TESTBEDS])
    raise UnknownNameError(
        f"unknown model {spec!r}: not an alias, an existing directory or a hub id (org/name); aliases: {names}"
    )


# -- recognising the family ----------------------------------------------------------------------------
def _identity(config: Any) -> tuple[str | None, tuple[str, ...]]:
    if isinstance(config, dict):
        return config.get("model_type"), tuple(config.get("architectures") or ())
    return getattr(config, "model_type", None), tuple(getattr(config, "architectures", None) or ())


def supported_architectures() -> str:
    from lowrank_kit.registry import adapters

    return "; ".join(
        f"{a.name} ({a.model_class}, model_type {'/'.join(a.model_types)})"
        for a in adapters()
        if a.name not in REFUSED
    )


def adapter_for_config(config: Any) -> ModelAdapter:
    """The registered adapter whose model_type (or architecture) ``config`` has.

    ``config`` is a transformers config or a ``config.json`` dict. An architecture no adapter claims is
    an error that lists the supported ones.
    """
    from lowrank_kit.registry import adapters

    model_type, archs = _identity(config)
    candidates = adapters()
    by_type = [a for a in candidates if model_type in a.model_types]
    found = by_type or [a for a in candidates if a.model_class in archs]
    if not found:
        what = f"model_type {model_type!r}" + (f", architectures {list(archs)}" if archs else "")
        raise ModelLoadError(f"unsupported architecture ({what}); supported: {supported_architectures()}")
    if len(found) > 1:
        names = ", ".join(a.name for a in found)
        raise ModelLoadError(
            f"model_type {model_type!r} is claimed by several adapters ({names}); uninstall one"
        )
    adapter = found[0]
    if adapter.name in REFUSED:
        raise ModelLoadError(REFUSED[adapter.name])
    return adapter


def model_class_for(config: Any) -> type:
    """The transformers ``...ForConditionalGeneration`` class that builds ``config``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type, archs = _identity(config)
    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        wanted = name or (archs[0] if archs else f"a model for model_type {model_type!r}")
        raise ModelLoadError(
            f"{wanted} is not in transformers {transformers.__version__}; upgrade transformers to load it"
        )
    return getattr(transformers, name)


# -- loading ---------------------------------------------------------------------------------------------
def _offline_message(hub_id: str, err: BaseException) -> str:
    return (
        f"cannot load model {hub_id!r}: it is not in the local Hugging Face cache and the hub could not be "
        f"reached or has no such repository ({_first_line(err)}); download it first "
        f"(`hf download {hub_id}`) or pass a local directory"
    )


def _config_dict(ms: ModelSpec) -> tuple[dict[str, Any], Path]:
    """The raw config.json of ``ms`` and the directory it was read from (a cache snapshot for hub ids)."""
    if ms.local_path is not None:
        file = ms.local_path / "config.json"
        try:
            return json.loads(file.read_text()), ms.local_path
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{str(file)!r} is not valid JSON ({err})") from None
    from transformers.utils import cached_file

    try:
        file = cached_file(ms.source, "config.json")
    except OSError as err:
        raise ModelLoadError(_offline_message(ms.source, err)) from None
    return json.loads(Path(file).read_text()), Path(file).parent


def _default_dtype(config: Any) -> torch.dtype:
    declared = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def load_processor(source: str | Path, *, trust_remote_code: bool = False):
    """The processor (tokenizer + image processor + chat template) saved at ``source``."""
    from transformers import AutoProcessor, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(
            f"no processor could be loaded from {str(source)!r} ({_first_line(err)})"
        ) from None
    if not isinstance(processor, ProcessorMixin):
        raise ModelLoadError(
            f"{str(source)!r} holds a {type(processor).__name__}, not a multimodal processor "
            "(tokenizer + image processor)"
        )
    return processor


def load_model(
    spec: str | ModelSpec,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    random_weights: bool = False,
    reporter: Reporter = NULL_REPORTER,
) -> LoadedModel:
    """Load a model, its processor and its adapter.

    ``random_weights`` builds the architecture without reading weights: from the alias preset for an
    alias (nothing is downloaded, there is no processor, and ``dtype`` defaults to bf16), from the
    config otherwise. ``dtype`` otherwise defaults to the checkpoint's own. The model is returned in
    eval mode on ``device``.
    """
    ms = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    if ms.local_path is not None:
        from lowrank_kit.checkpoint import is_compressed_checkpoint, load

        if is_compressed_checkpoint(ms.local_path):
            # A lowrank_kit output directory: rebuild its low-rank structure, then load its weights.
            return load(ms.local_path, device=device, dtype=dtype)
    with reporter.stage(f"load {ms.spec}", total=3) as stage:
        if random_weights and ms.kind == "alias":
            config = preset_config(ms.alias)
            adapter = adapter_for_config(config)
            adapter.attention_info(config)
            stage.advance()
            model = build_random_model(ms.alias, dtype=dtype or torch.bfloat16, device=device)
            stage.advance(2)
            return LoadedModel(
                model=model, processor=None, adapter=adapter, config=config, spec=ms.spec, path=None
            )

        raw, directory = _config_dict(ms)
        adapter = adapter_for_config(raw)
        if adapter.trust_remote_code and not trust_remote_code:
            raise ModelLoadError(
                f"model {ms.spec!r} ({adapter.display_name}) runs code from its repository; "
                "pass --trust-remote-code (trust_remote_code=True) if you trust it"
            )
        cls = model_class_for(raw)
        config = _load_config(ms, trust_remote_code)
        # Reading the geometry before the weights load turns an unusable config into a one-line error.
        adapter.attention_info(config)
        stage.advance()

        torch_dtype = dtype or _default_dtype(config)
        if random_weights:
            with torch.device(device):
                model = cls._from_config(config, dtype=torch_dtype)
        else:
            try:
                model = cls.from_pretrained(
                    ms.source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
                )
            except OSError as err:
                if ms.local_path is not None:
                    raise ModelLoadError(
                        f"cannot load the weights in {ms.source!r} ({_first_line(err)}); "
                        "the directory needs model.safetensors (or its shards) next to config.json"
                    ) from None
                raise ModelLoadError(_offline_message(ms.source, err)) from None
            except SafetensorError as err:
                from lowrank_kit.checkpoint import damaged_safetensors

                file, reason = damaged_safetensors(directory) or (directory, str(err))
                raise ModelLoadError(
                    f"weights file {str(file)!r} is corrupt or truncated ({reason}); download or save the "
                    "model again"
                ) from None
        model = model.to(device).eval()
        stage.advance()

        try:
            processor = load_processor(directory, trust_remote_code=trust_remote_code)
        except ModelLoadError as err:
            # A model without a processor still runs on prepared inputs; whatever needs one says so.
            log.warning("%s: loaded without a processor: %s", ms.spec, err)
            processor = None
        stage.advance()
    return LoadedModel(
        model=model, processor=processor, adapter=adapter, config=config, spec=ms.spec, path=directory
    )


def _load_config(ms: ModelSpec, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ms.source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(_offline_message(ms.source, err)) from None
    except ValueError as err:
        raise ModelLoadError(f"cannot read the config of {ms.spec!r} ({_first_line(err)})") from None


def list_models() -> list[dict[str, Any]]:
    """One row per alias and testbed: name, family, hub_id, params, description."""
    from lowrank_kit.registry import get_adapter

    rows = []
    for preset in PRESETS.values():
        adapter = get_adapter(preset.family)
        rows.append(
            {
                "name": preset.alias,
                "family": preset.family,
                "hub_id": preset.hub_id,
                "params": preset.params,
                "description": adapter.display_name,
            }
        )
    for name, size in TESTBEDS.items():
        rows.append(
            {
                "name": name,
                "family": "llava",
                "hub_id": None,
                "params": None,
                "description": f"the {size} testbed LLaVA, built locally on first use",
            }
        )
    return rows
