"""The compression pipeline: resolve a recipe, gather calibration data, run its steps, report.

:func:`compress` works on a model in memory; :func:`compress_to_directory` loads the recipe's model,
compresses it and writes a checkpoint atomically (nothing is left behind when a step fails).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_kit.calib_cache import CalibrationCache, default_cache_dir
from lowrank_kit.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    check_output_available,
    save_compressed,
    state_bytes,
)
from lowrank_kit.data.sources import build_calibration, resolve_calibration
from lowrank_kit.errors import CalibrationError, RecipeError
from lowrank_kit.loading import load_model, model_calibration_context
from lowrank_kit.methods.base import DecomposeJob, QuantizeJob
from lowrank_kit.methods.stats import StageRecorder
from lowrank_kit.models.base import ModelAdapter
from lowrank_kit.placement import Placement, as_placement, parse_memory, resolve_placement
from lowrank_kit.progress import NULL_REPORTER, Reporter
from lowrank_kit.quant.report import cache_report, logical_parameters
from lowrank_kit.quant.schemes import resolve_scheme
from lowrank_kit.ratios import compute_ratios
from lowrank_kit.recipe import DecomposeStep, QuantizeStep, Recipe, resolve_recipe
from lowrank_kit.registry import adapter_for_config, get_decomposer, get_quantizer
from lowrank_kit.sequential import LayerRunner, resident_devices
from lowrank_kit.surgery import apply_plan, describe_structure


@dataclass
class CompressionResult:
    model: nn.Module
    adapter: ModelAdapter
    recipe: Recipe  # resolved: every method parameter filled in
    report: dict[str, Any]
    processor: Any = None
    output: Path | None = None


def count_parameters(model: nn.Module) -> int:
    """Parameters, each shared tensor once; an integer-stored (quantized) weight counts one per element."""

    return logical_parameters(model)


def needs_calibration(recipe: Recipe) -> bool:

    for step in recipe.steps:
        if isinstance(step, DecomposeStep) and get_decomposer(step.method).needs_calibration:
            return True
        if isinstance(step, QuantizeStep) and any(
            get_quantizer(m).needs_calibration for m in step.methods or ()
        ):
            return True
    return False


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compress(
    model: nn.Module,
    recipe: Recipe,
    *,
    adapter: ModelAdapter | None = None,
    processor: Any = None,
    calibration: list | None = None,
    reporter: Reporter = NULL_REPORTER,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
    placement: Placement | None = None,
    device_map: str | None = None,
    max_gpu_memory: str | int | None = None,
) -> CompressionResult:
    """Compress ``model`` in place by the steps of ``recipe`` and return it with a report.

    ``placement`` with device map ``sequential`` or ``auto`` keeps the model in host memory and runs its
    decoder layers one at a time on the execution device (:mod:`lowrank_kit.sequential`); ``auto`` keeps
    as many layers resident there as fit the GPU budget. The compressed model is returned in host memory.
    ``device_map`` / ``max_gpu_memory`` build that placement (``device`` is then where layers run).

    ``calibration`` (a list of :class:`~lowrank_kit.data.calibration.CalibrationSample`) is built from the
    recipe's calibration spec when a step needs it and none is given (this needs ``processor``).
    ``cache_dir``: keep the calibration products there (:mod:`lowrank_kit.calib_cache`), so that a rerun
    of an interrupted compression resumes; None computes everything.
    """

    t_start = time.perf_counter()
    recipe = resolve_recipe(recipe)
    if len(recipe.quantize) > 1:
        raise RecipeError(
            f"a recipe may contain one quantize step (its methods run in order), got {len(recipe.quantize)}; "
            "merge them into one step with `methods: [...]`"
        )
    adapter = adapter or adapter_for_config(model.config)
    info = adapter.info(model)
    context = model_calibration_context(model.config, getattr(model.config, "_name_or_path", "") or "")
    calibration_spec = resolve_calibration(recipe.calibration, **context)
    recipe = recipe.model_copy(update={"calibration": calibration_spec})
    if device_map is not None or max_gpu_memory is not None:
        if placement is not None:
            raise RecipeError("give compress() a placement or device_map/max_gpu_memory, not both")
        placement = resolve_placement(device, device_map, max_gpu_memory)
        device = None if placement.dispatched else placement.execution_device
    if placement is not None and placement.offload_dir is not None:
        raise RecipeError(
            "compression keeps the model in host memory and streams its layers (--device-map sequential/auto); "
            "an offload directory applies to loading a checkpoint, not to compress()"
        )
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise RecipeError(
            f"the model has weights on the meta device ({offloaded[0]}, ...), e.g. offloaded by accelerate; "
            "load it into host memory and compress with device_map='sequential' or 'auto' instead"
        )
    runner = None
    if placement is not None and device is not None and torch.device(device) != placement.execution_device:
        raise RecipeError(
            f"compress() got device {device} and a placement that runs on {placement.execution_device}; give one"
        )
    if placement is not None and not placement.dispatched:
        model.to(placement.execution_device)  # the whole model on that one device
        device = placement.execution_device
    elif placement is not None:
        device = placement.execution_device
    else:
        device = torch.device(device) if device is not None else _model_device(model)
    timer = StageRecorder(NULL_REPORTER, device)
    params_before = count_parameters(model)
    weight_bytes_before = state_bytes(model)

    if needs_calibration(recipe) and calibration is None:
        if processor is None:
            raise CalibrationError(
                "this recipe needs calibration data, built with the model's processor, but the model has "
                "none; use a model directory that ships its processor (tokenizer + image processor), pass "
                "`calibration=` samples to compress(), or pick a method without calibration (svd)"
            )

        with timer.stage("calibration data"):
            calibration = build_calibration(recipe.calibration, processor, adapter, reporter=reporter)

    if placement is not None and placement.dispatched:
        tokens = sum(int(s.inputs["input_ids"].numel()) for s in calibration or ())
        runner = LayerRunner(model, adapter, device, resident_devices(model, adapter, placement, tokens))

    cache = None
    if cache_dir is not None and needs_calibration(recipe):
        cache = CalibrationCache.for_run(cache_dir, model, recipe, calibration, device)

    report: dict[str, Any] = {"method": None, "quant": None, "decompose": {}, "quantize": {}}
    # What every step's job reads, decomposer or quantizer.
    shared: dict[str, Any] = dict(
        model=model,
        adapter=adapter,
        info=info,
        calibration=calibration,
        reporter=reporter,
        device=device,
        seed=recipe.calibration.seed,
        cache=cache,
        runner=runner,
    )
    try:
        if runner is not None:
            runner.prepare()
        for step in recipe.steps:
            if isinstance(step, DecomposeStep):
                cls = get_decomposer(step.method)
                method = cls(cls.config_class.model_validate(step.params))
                job = DecomposeJob(
                    **shared,
                    targets=tuple(step.targets),
                    ratios=step.ratio_for(),
                    ranks={t: step.rank for t in step.targets} if step.rank is not None else None,
                    allocation=step.rank_allocation or cls.allocations[0],
                    granularity=step.granularity,
                )
                with timer.stage(f"decompose ({step.method})"):
                    plan = method.decompose(job)
                    apply_plan(model, adapter, plan)
                report["method"] = step.method
                report["decompose"] = {
                    "method": step.method,
                    "requested_ratio": step.ratio,
                    "requested_ratios": step.ratios,
                    "requested_rank": step.rank,
                    "targets": list(step.targets),
                    "rank_allocation": job.allocation,
                    "granularity": step.granularity,
                    "params": step.params,
                    **plan.report,
                }
            else:
                scheme = resolve_scheme(step.scheme)
                report["quant"] = scheme.name
                methods = list(step.methods or scheme.methods)
                entries: dict[str, Any] = {**scheme.describe(), "methods": methods}
                for name in methods:
                    cls = get_quantizer(name)
                    quantizer = cls(cls.config_class.model_validate(step.params.get(name, {})))
                    qjob = QuantizeJob(
                        **shared,
                        weight_bits=scheme.weight_bits,
                        act_bits=scheme.act_bits,
                        kv_bits=scheme.kv_bits,
                    )
                    with timer.stage(f"quantize ({name})"):
                        entries[name] = quantizer.quantize(qjob)

                entries.update(cache_report(model, adapter, scheme.kv_bits))
                report["quantize"] = entries

    finally:
        if runner is not None:  # a failed step too leaves the model in host memory, as it came
            runner.release()
    if runner is not None:
        report["placement"] = {
            **placement.describe(),
            "layers": runner.num_layers,
            "resident_layers": runner.resident_layers,
            "resident_on": sorted({str(d) for d in runner.resident if d is not None}),
            "layer_onloads": runner.moves,
        }
    else:
        report["placement"] = {"device_map": str(device), "execution_device": str(device)}
    ratios = compute_ratios(model, adapter)
    report.update(
        {
            "rho1": ratios.rho1,
            "rho2": ratios.rho2,
            "factor_params": ratios.factor_params,
            "replaced_params": ratios.replaced_params,
            "cache_elements_per_token": ratios.cache_elements_per_token,
            "original_cache_elements_per_token": ratios.original_cache_elements_per_token,
            "params_before": params_before,
            "params_after": count_parameters(model),
            "original_weight_bytes": weight_bytes_before,
            "weight_bytes": state_bytes(model),
            "ranks": describe_structure(model, adapter),
            "stages": timer.stages,
            "seconds": round(time.perf_counter() - t_start, 4),
            "num_calibration_samples": len(calibration) if calibration is not None else 0,
            "calibration_cache": cache.summary() if cache is not None else None,
        }
    )
    return CompressionResult(model=model, adapter=adapter, recipe=recipe, report=report, processor=processor)


def compress_to_directory(
    recipe: Recipe,
    output: str | Path,
    *,
    overwrite: bool = False,
    reporter: Reporter = NULL_REPORTER,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    evaluate: Callable[[CompressionResult], dict[str, Any]] | None = None,
    placement: Placement | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> CompressionResult:
    """Load ``recipe.model``, compress it and write the checkpoint to ``output`` atomically.

    With ``use_cache`` the calibration products are kept in ``cache_dir`` (default
    :func:`~lowrank_kit.calib_cache.default_cache_dir`), so that rerunning an interrupted compression
    resumes where it stopped and writes the same checkpoint. ``evaluate`` scores the compressed model
    before it is saved; what it returns is the report's ``evaluation`` (e.g. the CLI's perplexity).
    ``placement`` (instead of ``device``): see :func:`compress`; the model is loaded into host memory
    first. ``max_shard_size``: see :func:`~lowrank_kit.checkpoint.save_compressed`.
    """

    t0 = time.perf_counter()
    recipe = resolve_recipe(recipe)  # fail on bad names before any expensive work
    if placement is not None and device is not None:
        raise RecipeError("give a device or a placement (device map), not both")
    placement = placement or as_placement(device or "cpu")
    parse_memory(max_shard_size, "--max-shard-size")
    if evaluate is not None and placement.dispatched:
        raise RecipeError(
            f"--eval-data scores the model in memory, but --device-map {placement.device_map} leaves the "
            "compressed model in host memory; evaluate the saved checkpoint with `lowrank eval OUTPUT "
            "--device-map auto` instead"
        )
    output = check_output_available(output, overwrite=overwrite)
    cache_dir = _cache_location(cache_dir, use_cache)
    loaded = load_model(
        recipe.model,
        dtype=dtype,
        device="cpu" if placement.dispatched else placement,
        trust_remote_code=trust_remote_code,
        reporter=reporter,
    )
    result = compress(
        loaded.model,
        recipe,
        adapter=loaded.adapter,
        processor=loaded.processor,
        reporter=reporter,
        device=None if placement.dispatched else placement.execution_device,
        cache_dir=cache_dir,
        placement=placement if placement.dispatched else None,
    )
    result.report["model"] = recipe.model
    if evaluate is not None:
        result.report["evaluation"] = evaluate(result)
    result.report["seconds"] = round(time.perf_counter() - t0, 4)
    result.output = save_compressed(
        result, output, overwrite=overwrite, source=loaded.path, max_shard_size=max_shard_size
    )
    result.report["output"] = str(result.output)
    return result


def _cache_location(cache_dir: str | Path | None, use_cache: bool) -> Path | None:

    if not use_cache:
        if cache_dir is not None:
            raise RecipeError("--no-cache and --cache-dir contradict each other; give one of them")
        return None
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
