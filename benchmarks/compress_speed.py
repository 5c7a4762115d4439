"""Compression speed and memory of a calibrated decomposer on a real architecture with random weights.

Builds a preset (default: the LLaVA-1.5-7B architecture, fp16, random weights) on the device, makes
synthetic calibration samples of realistic length (one image's worth of image tokens plus text, the
answer tokens labelled), runs the method end to end (calibration statistics, factorization, ranks,
local fine-tuning, module surgery) and writes JSON: wall time and peak memory per stage, ρ1, ρ2.

    python benchmarks/compress_speed.py --params '{"finetune": true}' --output benchmarks/results/compress_wsvd_llava-1.5-7b_h100.json
    python benchmarks/compress_speed.py --tiny llava --device cpu --samples 4   # a smoke run anywhere

Random weights give the real shapes and the real amount of work; the numbers say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.methods.base import DecomposeJob
from lowrank_kit.progress import Reporter, Stage
from lowrank_kit.ratios import compute_ratios
from lowrank_kit.registry import adapter_for_config, get_decomposer
from lowrank_kit.surgery import apply_plan

GIB = 2**30


class PrintReporter(Reporter):
    """One line per finished stage, so a log without a terminal still shows progress."""

    def _finish(self, stage: Stage) -> None:
        print(f"  {stage.name}: {time.perf_counter() - stage.started:.1f} s", file=sys.stderr, flush=True)


def llava_samples(
    model, count: int, text_tokens: int, answer_tokens: int, seed: int
) -> list[CalibrationSample]:
    """Prompt text, one image's placeholder tokens, question text and an answer, as LLaVA-1.5 sees them."""
    config = model.config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    n_image = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    vocab = config.text_config.vocab_size
    image_token = config.image_token_id
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        before = torch.randint(3, min(vocab, image_token), (text_tokens // 4,), generator=gen)
        after = torch.randint(3, min(vocab, image_token), (text_tokens - text_tokens // 4,), generator=gen)
        ids = torch.cat([torch.tensor([1]), before, torch.full((n_image,), image_token), after])[None]
        labels = torch.full_like(ids, -100)
        labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
        pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=gen).to(dtype)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        samples.append(CalibrationSample(inputs, labels).to(device))
    return samples


def tiny_samples(model, count: int, answer_tokens: int, seed: int) -> list[CalibrationSample]:
    from lowrank_kit.models.tiny import tiny_inputs

    out = []
    for i in range(count):
        inputs = tiny_inputs(model, seed=seed + i)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -answer_tokens:] = inputs["input_ids"][:, -answer_tokens:]
        out.append(CalibrationSample(inputs, labels))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llava-1.5-7b", help="a LLaVA-family preset alias")
    p.add_argument("--tiny", default=None, help="use this family's tiny model instead (smoke runs)")
    p.add_argument("--method", default="wsvd")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--allocation", default=None, help="rank allocation (default: the method's first)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument(
        "--text-tokens", type=int, default=64, help="text tokens around the image, answer included"
    )
    p.add_argument("--answer-tokens", type=int, default=4)
    p.add_argument("--params", default="{}", help="method parameters as JSON, e.g. '{\"ft_steps\": 100}'")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.tiny:
        from lowrank_kit.models.tiny import build_tiny_model

        model = build_tiny_model(args.tiny, seed=args.seed, dtype=dtype).to(device)
        samples = tiny_samples(model, args.samples, args.answer_tokens, args.seed)
        model_name = f"tiny-{args.tiny}"
    else:
        from lowrank_kit.models.presets import build_random_model

        model = build_random_model(args.model, dtype=dtype, device=device, seed=args.seed)
        if model.config.model_type != "llava":
            raise SystemExit(
                f"--model {args.model!r} is a {model.config.model_type!r} model; this script builds LLaVA inputs"
            )
        samples = llava_samples(model, args.samples, args.text_tokens, args.answer_tokens, args.seed)
        model_name = args.model
    _sync(device)
    build_seconds = time.perf_counter() - t0

    adapter = adapter_for_config(model.config)
    info = adapter.info(model)
    cls = get_decomposer(args.method)
    method = cls(cls.config_class.model_validate(json.loads(args.params)))
    targets = ("q_proj", "k_proj", "v_proj")
    job = DecomposeJob(
        model=model,
        adapter=adapter,
        info=info,
        targets=targets,
        ratios=dict.fromkeys(targets, args.ratio),
        allocation=args.allocation or cls.allocations[0],
        calibration=samples,
        reporter=PrintReporter(),
        device=device,
        seed=args.seed,
    )
    _sync(device)
    t1 = time.perf_counter()
    plan = method.decompose(job)
    _sync(device)
    t2 = time.perf_counter()
    apply_plan(model, adapter, plan)
    _sync(device)
    t3 = time.perf_counter()
    ratios = compute_ratios(model, adapter)
    with torch.no_grad():
        moved = samples[0].to(device, dtype=dtype)
        finite = bool(torch.isfinite(model(**moved.inputs, use_cache=False).logits).all())

    stages = plan.report["stages"] + [{"stage": "module surgery", "seconds": round(t3 - t2, 4)}]
    result = {
        "benchmark": "compress_speed",
        "model": model_name,
        "method": args.method,
        "params": method.config.model_dump(mode="json"),
        "rank_allocation": job.allocation,
        "requested_rho1": args.ratio,
        "rho1": ratios.rho1,
        "rho2": ratios.rho2,
        "dtype": args.dtype,
        "calibration_samples": len(samples),
        "tokens_per_sample": samples[0].num_tokens,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "build_model_seconds": round(build_seconds, 3),
        "compress_seconds": round(t3 - t1, 3),
        "stages": stages,
        "peak_gpu_memory_bytes": plan.report.get("peak_gpu_memory_bytes"),
        "finetune": plan.report.get("finetune"),
        "compressed_forward_finite": finite,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'stage':<34} {'seconds':>9} {'peak GPU GiB':>13}")
    for s in stages:
        peak = s.get("peak_gpu_memory_bytes")
        print(f"{s['stage']:<34} {s['seconds']:>9.2f} {peak / GIB if peak else float('nan'):>13.2f}")
    print(f"{'compress end to end':<34} {t3 - t1:>9.2f}   rho1 {ratios.rho1:.4f} rho2 {ratios.rho2:.4f}")
    return result


if __name__ == "__main__":
    main()
