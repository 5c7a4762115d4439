"""Train testbed variants side by side and report each one's build time and test accuracy.

The evidence behind the testbed's shipped training settings (docs/testbed.md): each variant is a
testbed size with some architecture or training fields overridden, built exactly as
``lowrank testbed build`` builds it (same data, supervision, seed, thread count, scoring), in its
own process and temporary directory, several at a time on a machine with the cores for it.

    python benchmarks/testbed_sweep.py --jobs 1 \
        --variant '{"size": "small"}' --variant '{"size": "small", "train_items": 15000}' \
        --output benchmarks/results/testbed_sweep.json

A variant's ``seed`` replaces the testbed seed (data splits and initialisation, to show how much
accuracy depends on it); its other keys besides ``size`` and ``name`` are fields of ``TestbedSize`` (``hidden``,
``layers``, ...) or of its ``TrainSettings`` (``train_items``, ``steps``, ``lr``, ...). Timings are
only comparable between variants run with the same ``--jobs`` on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _spec(variant: dict[str, Any]):
    from lowrank_kit.testbed.model import SIZES
    from lowrank_kit.testbed.train import TrainSettings

    size = variant.get("size", "small")
    if size not in SIZES:
        raise SystemExit(f"unknown testbed size {size!r}; valid: {', '.join(SIZES)}")
    spec = SIZES[size]
    arch_fields = {f.name for f in dataclasses.fields(spec)} - {"name", "train"}
    train_fields = {f.name for f in dataclasses.fields(TrainSettings)}
    arch, train = {}, {}
    for key, value in variant.items():
        if key in ("size", "name", "seed"):
            continue
        if key in arch_fields:
            arch[key] = value
        elif key in train_fields:
            train[key] = tuple(value) if isinstance(value, list) else value
        else:
            valid = ", ".join(sorted(arch_fields | train_fields))
            raise SystemExit(f"variant {variant}: unknown field {key!r}; valid: size, name, seed, {valid}")
    from lowrank_kit.errors import LowRankError

    try:
        return size, dataclasses.replace(spec, train=dataclasses.replace(spec.train, **train), **arch)
    except LowRankError as exc:
        raise SystemExit(f"variant {variant}: {exc}") from None


def _compression(model_dir: Path, methods: list[str], ratios: list[float]) -> dict[str, Any]:
    """Test accuracy of the built variant compressed by each method at each ρ1 (the accuracy grid)."""
    from lowrank_kit.eval.grid import GridSpec, run_accuracy_grid

    results = run_accuracy_grid(
        GridSpec(model=str(model_dir), methods=methods, ratios=ratios, data="testbed"),
        model_dir / "grid",
        calib_cache_dir=model_dir / "calib",
    )
    return {
        "fp16": results["fp16"]["accuracy"],
        **{key: {"accuracy": c["accuracy"], "kl": c["kl"]} for key, c in results["cells"].items()},
    }


def _run(job: tuple[dict[str, Any], list[str], list[float]]) -> dict[str, Any]:
    from lowrank_kit.testbed import build as B

    variant, methods, ratios = job
    size, spec = _spec(variant)
    seed = int(variant.get("seed", B.SEED))  # the data (train and test splits) and the initialisation
    started = time.perf_counter()
    compression = None
    with tempfile.TemporaryDirectory(prefix="testbed-sweep-") as tmp:
        try:
            model_dir = Path(tmp) / "model"
            model_dir.mkdir()
            info = B.build_testbed(size, model_dir, device="cpu", spec=spec, seed=seed)
            if methods and ratios:
                import torch

                torch.set_num_threads(spec.threads or 2)  # as many as the build used, per variant
                compression = _compression(model_dir, methods, ratios)
        except Exception as exc:  # one failed variant must not lose the others' results
            return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "compression": compression,
        "variant": variant,
        "test_accuracy": info["test_accuracy"],
        "per_category": info["test_accuracy_per_category"],
        "build_seconds": info["build_seconds"],
        "train_seconds": info["train_seconds"],
        "data_seconds": info["data_seconds"],
        "final_loss": info["training"]["final_loss"],
        "parameters": info["parameters"],
        "weights_sha256": info["weights_sha256"],
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", action="append", required=True, help="JSON object; repeat")
    parser.add_argument("--jobs", type=int, default=1, help="variants built at once (2 threads each)")
    parser.add_argument("--output", type=Path, help="JSON file for the results")
    parser.add_argument(
        "--methods", default="", help="after each build, compress it with these methods (comma-separated)"
    )
    parser.add_argument("--ratios", default="0.9,0.7,0.5", help="ρ1 values for --methods")
    args = parser.parse_args(argv)
    variants = []
    for text in args.variant:
        try:
            variant = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--variant {text!r} is not JSON: {exc}") from None
        if not isinstance(variant, dict):
            raise SystemExit(f"--variant {text!r} must be a JSON object")
        _spec(variant)  # validate every variant before any training starts
        variants.append(variant)
    import torch
    import transformers

    results = []
    ctx = mp.get_context("spawn")
    # A fresh process per variant: nothing (allocator state, thread pools) carries over between builds.
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    jobs = [(v, methods, ratios) for v in variants]
    with ctx.Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        for result in pool.imap(_run, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {
        "jobs": args.jobs,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": mp.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
