"""Integer execution on a GPU (issue 22): which backend computes a quantized linear fastest, and how much
memory a W8 checkpoint takes once loaded.

Three parts (``--parts``):

- ``linears``: for LLaVA-NeXT-7B's layer shapes, at 1 / 8 / 64 / 512 / 4096 rows, the time of one
  ``y = x · Wᵀ`` with fp16 weights (``F.linear``, the baseline), and from int8 and packed int4 weights by
  ``naive`` (unpack into a temporary, then ``F.linear``), the Triton weight-only kernel and, for W8A8,
  ``torch._int_mm`` (per-token activation quantization included in its time). Each is timed as the median
  of CUDA-event timings over ``--iters`` calls after warm-up; decode sizes also report the weight bytes
  read per second against the device-to-device copy bandwidth measured in the same run.
- ``sweep``: launch shapes (column tile, K tile, warps, stages) of the Triton kernel at 8 rows, per
  layer shape and bit width; the best ones became :func:`~lowrank_kit.kernels.int_linear.triton.launch_config`'s
  decode branch.
- ``memory``: a random-weight model of ``--arch`` (all its layers) in fp16 on the GPU, then the same
  model quantized ``w8a16`` (every language-model linear int8, lm_head and embeddings fp16), saved,
  loaded back with ``lowrank_kit.load(device="cuda")``, run (a prefill and a few greedy tokens): GPU
  bytes allocated and the bytes of every tensor the model holds, before and after running, against fp16.

    python benchmarks/int_linear.py --output benchmarks/results/int_linear_h100.json

Writes one JSON (settings, device, results) to ``--output``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = {"q_proj / o_proj": (4096, 4096), "gate / up": (11008, 4096), "down": (4096, 11008)}
ROWS = (1, 8, 64, 512, 4096)


def timed(fn, iters: int) -> float:
    """Median seconds of one call over ``iters`` CUDA-event timings, after 5 warm-up calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), iters)
    return 2 * nbytes / t  # read + write


def shape_rows(name: str, n: int, k: int, iters: int) -> list[dict[str, Any]]:
    from lowrank_kit.kernels.int_linear import int8_linear, int_linear
    from lowrank_kit.quant.primitives import pack, quantize_tokens

    w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
    q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    q4 = pack(torch.randint(-7, 8, (n, k), device="cuda", dtype=torch.int8), 4)
    scale = torch.rand(n, device="cuda") * 1e-3
    out = []
    for m in ROWS:
        x = torch.randn(m, k, device="cuda").half()

        def w8a8(x: torch.Tensor = x) -> torch.Tensor:
            xq, xs = quantize_tokens(x, 8)
            return int8_linear(xq, xs, q, scale, torch.float16)

        calls = {
            "fp16": lambda x=x: F.linear(x, w16),
            "w8 naive": lambda x=x: int_linear(x, q, scale, 8, k, "naive"),
            "w8 triton": lambda x=x: int_linear(x, q, scale, 8, k, "triton"),
            "w4 triton": lambda x=x: int_linear(x, q4, scale, 4, k, "triton"),
        }
        if m >= 17:
            calls["w8a8 int_mm"] = w8a8
        entry: dict[str, Any] = {"layer": name, "n": n, "k": k, "rows": m}
        entry.update({key: timed(fn, iters) for key, fn in calls.items()})
        if m <= 64:
            entry["weight_GBps"] = {
                "fp16": 2 * n * k / entry["fp16"] / 1e9,
                "w8 triton": n * k / entry["w8 triton"] / 1e9,
                "w4 triton": n * k / 2 / entry["w4 triton"] / 1e9,
            }
        out.append(entry)
        print(f"{name:16s} M={m:5d}: " + ", ".join(f"{c} {entry[c] * 1e6:.1f} us" for c in calls), flush=True)
    return out


def part_linears(iters: int) -> dict[str, Any]:
    bandwidth = copy_bandwidth()
    rows = [row for name, (n, k) in SHAPES.items() for row in shape_rows(name, n, k, iters)]
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows}


def part_sweep(iters: int) -> dict[str, Any]:
    """Launch shapes of the Triton kernel at decode sizes (8 rows), W8 and W4, per layer shape."""
    from lowrank_kit.kernels.int_linear.triton import IntLinearConfig, int_linear
    from lowrank_kit.quant.primitives import pack

    configs = [
        IntLinearConfig(16, bn, bk, 4, st, swapped, split_k)
        for swapped in (False, True)
        for bn in ((16, 32, 64) if not swapped else (32, 64, 128))
        for bk in (128, 256)
        for st in (3, 4)
        for split_k in (1, 2, 4, 8)
    ]
    out = []
    for name, (n, k) in SHAPES.items():
        x = torch.randn(8, k, device="cuda").half()
        scale = torch.rand(n, device="cuda") * 1e-3
        stored = {
            8: torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
            4: pack(torch.randint(-7, 8, (n, k), device="cuda", dtype=torch.int8), 4),
        }
        fp16_us = (
            timed(
                functools.partial(torch.nn.functional.linear, x, torch.randn(n, k, device="cuda").half()),
                iters,
            )
            * 1e6
        )
        for bits, q in stored.items():
            times = {}
            for cfg in configs:
                try:
                    call = functools.partial(int_linear, x, q, scale, bits, k, cfg)
                    times[cfg] = timed(call, iters)
                except Exception as err:  # a shape that does not fit in shared memory
                    print(f"  {cfg}: {type(err).__name__}", flush=True)
            best = min(times, key=times.get)
            weight_bytes = n * k * bits // 8
            out.append(
                {
                    "layer": name, "n": n, "k": k, "bits": bits, "rows": 8, "fp16_us": fp16_us,
                    "best": best.__dict__, "best_us": times[best] * 1e6,
                    "best_GBps": weight_bytes / times[best] / 1e9,
                    "all": [{**c.__dict__, "us": t * 1e6} for c, t in times.items()],
                }
            )  # fmt: skip
            print(f"{name:16s} W{bits}: best {best} {times[best] * 1e6:.1f} us "
                  f"({weight_bytes / times[best] / 1e9:.0f} GB/s; fp16 {fp16_us:.1f} us)", flush=True)  # fmt: skip
    return {"rows": out}


def gpu_bytes() -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def part_memory(arch: str, context: int, new_tokens: int) -> dict[str, Any]:
    import lowrank_kit
    from lowrank_kit.bench.e2e import E2ESettings, build, calibration_samples, prompt_ids
    from lowrank_kit.checkpoint import save_compressed
    from lowrank_kit.pipeline import compress
    from lowrank_kit.quant.report import held_tensor_bytes
    from lowrank_kit.recipe import parse_recipe

    out: dict[str, Any] = {"arch": arch, "context": context, "new_tokens": new_tokens}

    def run(model) -> dict[str, Any]:
        ids = prompt_ids(model, 1, context, 0)
        held_before = held_tensor_bytes(model)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
        return {
            "held_bytes_before_run": held_before,
            "held_bytes_after_run": held_tensor_bytes(model),
            "allocated_after_run": gpu_bytes(),
            "peak_during_run": int(torch.cuda.max_memory_allocated()),
        }

    base = gpu_bytes()
    model = build(E2ESettings(arch=arch, device="cuda", dtype="float16"))
    out["fp16"] = {"allocated": gpu_bytes() - base, **run(model)}
    print(f"fp16: {out['fp16']['allocated'] / 2**30:.2f} GiB allocated", flush=True)

    t0 = time.perf_counter()
    recipe = parse_recipe(
        {"model": arch, "steps": [{"type": "quantize", "scheme": "w8a16"}]}, origin="int_linear"
    )
    result = compress(model, recipe, calibration=calibration_samples(model, 2, 256, 0))
    out["quantize_seconds"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=str(Path.home())) as tmp:
        path = save_compressed(result, Path(tmp) / "w8")
        out["disk_bytes"] = result.report["disk_bytes"]
        del model, result
        gc.collect()
        torch.cuda.empty_cache()
        base = gpu_bytes()
        t0 = time.perf_counter()
        loaded = lowrank_kit.load(path, device="cuda")
        out["load_seconds"] = time.perf_counter() - t0
        out["w8"] = {"allocated": gpu_bytes() - base, **run(loaded.model)}
    out["w8_over_fp16_allocated"] = out["w8"]["allocated"] / out["fp16"]["allocated"]
    out["w8_over_fp16_held_after_run"] = (
        out["w8"]["held_bytes_after_run"] / out["fp16"]["held_bytes_after_run"]
    )
    print(
        f"w8: {out['w8']['allocated'] / 2**30:.2f} GiB allocated ({out['w8_over_fp16_allocated']:.3f} of fp16); "
        f"held after a run {out['w8']['held_bytes_after_run'] / 2**30:.2f} GiB",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="linears,memory")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--arch", default="llava-next-7b")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/int_linear.py needs a CUDA GPU")
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    res: dict[str, Any] = {
        "benchmark": "int_linear",
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    if "linears" in parts:
        res["linears"] = part_linears(a.iters)
    if "sweep" in parts:
        res["sweep"] = part_sweep(a.iters)
    if "memory" in parts:
        res["memory"] = part_memory(a.arch, a.context, a.new_tokens)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
