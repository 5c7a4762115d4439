"""The one way in: from ``--model`` or a checkpoint directory to a loaded model (then the runtime).

``--model`` accepts an alias (``lowrank models`` lists them), a local directory written by
``save_pretrained``, a hub id ``org/name`` (from the local Hugging Face cache, or downloaded when the
hub is reachable), or ``testbed`` / ``testbed-tiny`` (built locally on first use). The family is then
recognised from the config's ``model_type`` / ``architectures`` through the registered adapters; an
unknown architecture is an error listing what is supported, never a guess. A lowrank_kit output
directory (:mod:`lowrank_kit.checkpoint` is its format) loads through :func:`load`, which verifies it,
rebuilds its compressed structure through transformers' ``from_pretrained`` and, when asked, switches on
latent decoding (:mod:`lowrank_kit.runtime`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils import cached_file

from lowrank_kit.checkpoint import (
    damaged_safetensors,
    is_compressed_checkpoint,
    read_lowrank_config,
    verify_manifest,
)
from lowrank_kit.errors import CheckpointError, LowRankError, ModelLoadError, UnknownNameError
from lowrank_kit.hf_integration import manifest_already_verified
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.models.classes import model_class_for
from lowrank_kit.models.packaged import PACKAGED, ensure_packaged, packaged_alias_of
from lowrank_kit.models.presets import PRESETS, build_random_model, preset_config
from lowrank_kit.placement import Placement, as_placement, from_pretrained_kwargs, resolve_placement
from lowrank_kit.progress import NULL_REPORTER, Reporter
from lowrank_kit.registry import adapter_for_config, get_adapter
from lowrank_kit.runtime import enable_latent_decode
from lowrank_kit.testbed import ensure_testbed, is_testbed_dir

log = logging.getLogger(__name__)

TESTBEDS = {"testbed": "small", "testbed-tiny": "tiny"}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")

SpecKind = Literal["alias", "local", "hub", "testbed", "packaged"]


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
        return Path(self.source) if self.kind in ("local", "testbed", "packaged") else None


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
        return ModelSpec(spec, "testbed", str(Path(ensure_testbed(TESTBEDS[spec]))))
    if spec in PACKAGED:
        # A real pretrained model shipped inside a PyPI wheel, converted once into the lowrank_kit cache.
        return ModelSpec(
            spec, "packaged", str(ensure_packaged(spec)), alias=spec, family=PACKAGED[spec].family
        )
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
    names = ", ".join([*PRESETS, *PACKAGED, *TESTBEDS])
    raise UnknownNameError(
        f"unknown model {spec!r}: not an alias, an existing directory or a hub id (org/name); aliases: {names}"
    )


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


def load_processor(source: str | Path, *, trust_remote_code: bool = False, text_only: bool = False):
    """The processor (tokenizer + image processor + chat template) saved at ``source``; for a text-only
    model (``text_only``), its tokenizer."""
    auto = AutoTokenizer if text_only else AutoProcessor
    what = "tokenizer" if text_only else "processor"
    try:
        processor = auto.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"no {what} could be loaded from {str(source)!r} ({_first_line(err)})") from None
    if not text_only and not isinstance(processor, ProcessorMixin):
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
    eval mode on ``device``, which may be a :class:`~lowrank_kit.placement.Placement` (``auto`` spreads a
    pretrained model through accelerate, see :func:`load`).
    """
    placement = as_placement(device)
    ms = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    if ms.local_path is not None and is_compressed_checkpoint(ms.local_path):
        # A lowrank_kit output directory: rebuild its low-rank structure, then load its weights.
        return load(ms.local_path, device=placement, dtype=dtype)
    with reporter.stage(f"load {ms.spec}", total=3) as stage:
        if random_weights and ms.kind == "alias":
            config = preset_config(ms.alias)
            adapter = adapter_for_config(config)
            adapter.attention_info(config)
            stage.advance()
            model = build_random_model(ms.alias, dtype=dtype or torch.bfloat16, device=_single(placement))
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
        spread = {} if random_weights else from_pretrained_kwargs(placement)
        if random_weights:
            with torch.device(_single(placement)):
                model = cls._from_config(config, dtype=torch_dtype)
        else:
            try:
                model = cls.from_pretrained(
                    ms.source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **spread
                )
            except OSError as err:
                if ms.local_path is not None:
                    raise ModelLoadError(
                        f"cannot load the weights in {ms.source!r} ({_first_line(err)}); "
                        "the directory needs model.safetensors (or its shards) next to config.json"
                    ) from None
                raise ModelLoadError(_offline_message(ms.source, err)) from None
            except SafetensorError as err:
                file, reason = damaged_safetensors(directory) or (directory, str(err))
                raise ModelLoadError(
                    f"weights file {str(file)!r} is corrupt or truncated ({reason}); download or save the "
                    "model again"
                ) from None
        if not spread:
            model = model.to(placement.execution_device)
        model = model.eval()
        stage.advance()

        try:
            processor = load_processor(
                directory, trust_remote_code=trust_remote_code, text_only=adapter.text_only
            )
        except ModelLoadError as err:
            # A model without a processor still runs on prepared inputs; whatever needs one says so.
            log.warning("%s: loaded without a processor: %s", ms.spec, err)
            processor = None
        stage.advance()
    return LoadedModel(
        model=model, processor=processor, adapter=adapter, config=config, spec=ms.spec, path=directory
    )


def _single(placement: Placement) -> torch.device:
    """A model built here (random weights) is built whole on one device: a spread model is built in host
    memory, and compression streams its layers from there."""
    return torch.device("cpu") if placement.dispatched else placement.execution_device


def _load_config(ms: ModelSpec, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(ms.source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(_offline_message(ms.source, err)) from None
    except ValueError as err:
        raise ModelLoadError(f"cannot read the config of {ms.spec!r} ({_first_line(err)})") from None


def calibration_context(spec: str) -> dict[str, Any] | None:
    """What ``source: auto`` calibration depends on for ``--model`` (``testbed``, ``text_only``, ``corpus``:
    the keywords of :func:`~lowrank_kit.data.sources.resolve_calibration`), read without building,
    downloading or loading anything; None where that cannot be known offline (a hub id whose config is not
    in the local cache)."""
    if spec in TESTBEDS:
        return {"testbed": True, "text_only": False, "corpus": None}
    if spec in PACKAGED:
        packaged = PACKAGED[spec]
        text_only = get_adapter(packaged.family).text_only
        return {"testbed": False, "text_only": text_only, "corpus": packaged.calibration}
    if spec in PRESETS:
        return {"testbed": False, "text_only": get_adapter(PRESETS[spec].family).text_only, "corpus": None}
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return model_calibration_context(json.loads((path / "config.json").read_text()), path)
    if _HUB_ID.fullmatch(spec):
        try:
            file = cached_file(spec, "config.json", local_files_only=True)
        except OSError:
            return None
        if file:
            return model_calibration_context(json.loads(Path(file).read_text()), "")
    return None


def model_calibration_context(config: Any, directory: str | Path) -> dict[str, Any]:
    """:func:`calibration_context` of a model (its config) loaded from ``directory``."""
    alias = packaged_alias_of(directory)
    return {
        "testbed": is_testbed_dir(directory),
        "text_only": adapter_for_config(config).text_only,
        "corpus": PACKAGED[alias].calibration if alias else None,
    }


def list_models() -> list[dict[str, Any]]:
    """One row per alias, packaged model and testbed: name, family, hub_id, params, description."""
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
    for packaged in PACKAGED.values():
        rows.append(
            {
                "name": packaged.alias,
                "family": packaged.family,
                "hub_id": packaged.original,
                "params": packaged.params,
                "description": f"{packaged.description}; from the PyPI wheel {packaged.requirement}",
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


def load(
    path: str | Path,
    *,
    device: str | torch.device | Placement = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    latent_decode: bool = False,
    cuda_graph: bool = False,
    device_map: str | None = None,
    max_gpu_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
):
    """Load a compressed checkpoint; returns a :class:`LoadedModel`.

    Every file's checksum is verified first; the model is then built by transformers' ``from_pretrained``
    (through :mod:`lowrank_kit.hf_integration`), and any weight it did not find is an error.
    ``latent_decode=True`` also runs :func:`lowrank_kit.runtime.enable_latent_decode` on it, so that
    ``generate`` caches latents (the checkpoint's K and V must be low-rank); ``cuda_graph=True`` (with
    it) makes ``generate``'s decode steps replay a CUDA graph (:mod:`lowrank_kit.runtime.graph`).
    ``device_map="auto"`` (with ``max_gpu_memory`` per GPU, e.g. ``"40GiB"``, and ``offload_dir``) spreads
    the model over the GPUs, host memory and disk through accelerate (``model.hf_device_map`` says where);
    ``device`` may also be a :class:`~lowrank_kit.placement.Placement`.
    """
    if device_map is not None or max_gpu_memory is not None or offload_dir is not None:
        placement = resolve_placement(
            None if device == "cpu" else device, device_map, max_gpu_memory, offload_dir
        )
    else:
        placement = as_placement(device)
    spread = from_pretrained_kwargs(placement)
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is a file; pass the directory that holds config.json")
    if cuda_graph and not latent_decode:
        raise CheckpointError("cuda_graph=True replays latent decode steps; pass latent_decode=True with it")
    read_lowrank_config(p)
    verify_manifest(p)
    config = transformers.AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    adapter = adapter_for_config(config)
    cls = getattr(transformers, adapter.model_class, None)
    if cls is None:
        raise CheckpointError(
            f"{str(p)!r} needs transformers.{adapter.model_class}, which transformers "
            f"{transformers.__version__} lacks; upgrade transformers"
        )
    with manifest_already_verified(p):
        model, info = cls.from_pretrained(
            p,
            config=config,
            dtype=dtype or "auto",
            output_loading_info=True,
            trust_remote_code=trust_remote_code,
            **spread,
        )
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        found = "; ".join(f"{k.replace('_', ' ')} {v[:3]}" for k, v in problems.items() if v)
        raise CheckpointError(f"checkpoint {str(p)!r} does not match its model class: {found}")
    if not spread:
        model.to(placement.execution_device)
    model.eval()
    if latent_decode:
        enable_latent_decode(model, adapter=adapter, cuda_graph=cuda_graph)
    try:
        processor = load_processor(p, trust_remote_code=trust_remote_code, text_only=adapter.text_only)
    except LowRankError:
        processor = None
    return LoadedModel(model=model, processor=processor, adapter=adapter, config=config, spec=str(p), path=p)
