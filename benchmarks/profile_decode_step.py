"""Where a decode step's time goes: torch.profiler over a few greedy decode steps of the end-to-end
benchmark's model (``benchmarks/decode_e2e.py``: LLaVA-NeXT-7B preset, random weights, batch 8,
8192-token context by default), uncompressed on transformers and wsvd at ρ1 = 0.5 on the latent
backend. Writes the operator tables (host time and device time per operator, top rows) and per-step
host/device totals as JSON::

    python benchmarks/profile_decode_step.py --output /tmp/profile.json
    python benchmarks/profile_decode_step.py --graph --output /tmp/profile_graph.json
    python benchmarks/profile_decode_step.py --tiny --device cpu --dtype float32 --output /tmp/p.json

A step is host-bound when the host's time to issue it exceeds the device time of what it issues.
``--graph`` profiles steps replayed from CUDA graphs instead (the latent side through a
``LatentDecodeGraph``, the baseline on transformers' ``StaticCache``): where the device time of a
launch-free step goes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lowrank_kit.bench.e2e import (
    DTYPES,
    TINY_RUN,
    E2ESettings,
    _cache_kwarg,
    _sync,
    build,
    compress_for_run,
    decode_stepper,
    new_decode_cache,
    prompt_ids,
)
from lowrank_kit.runtime import enable_latent_decode


def _rows(prof) -> list[dict]:
    """One row per operator or kernel of the profile: calls, host and device time (µs, all steps)."""
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None)
        if dev is None:
            dev = getattr(e, "cuda_time_total", 0.0)
        rows.append(
            {
                "name": e.key,
                "calls": e.count,
                "host_self_us": e.self_cpu_time_total,
                "host_total_us": e.cpu_time_total,
                "device_self_us": getattr(
                    e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)
                ),
                "device_total_us": dev,
            }
        )
    return rows


@torch.no_grad()
def profile_steps(model, ids: torch.Tensor, latent: bool, steps: int, top: int, mode: str = "eager") -> dict:
    device = ids.device
    kw = _cache_kwarg(model)
    cache = new_decode_cache(model, mode, latent, ids.shape[1] + 2 * steps + 4)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    step, runner = decode_stepper(model, cache, mode, ids.shape[0], device)

    for _ in range(2):  # warm-up steps (compilation, allocator; a graph's eager step and its capture)
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(device)
    # Unprofiled timing of the same number of steps first, then the profiled ones.
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    # Host time to issue one step: time until the last launch returns, without waiting for the device.
    _sync(device)
    t0 = time.perf_counter()
    tok = step(tok).argmax(-1, keepdim=True)
    issue_ms = 1e3 * (time.perf_counter() - t0)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tok = step(tok).argmax(-1, keepdim=True)
        _sync(device)
    rows = _rows(prof)
    key = "device_self_us" if device.type == "cuda" else "host_self_us"
    # Kernels only: an aten operator's row repeats the device time of the kernels it launched.
    kernels = [r for r in rows if not r["name"].startswith("aten::")]
    launches = sum(r["calls"] for r in rows if "LaunchKernel" in r["name"])
    if runner is not None and hasattr(runner, "close"):
        runner.close()
    return {
        "mode": mode,
        "wall_ms_per_step": wall_ms,
        "host_issue_ms_one_step": issue_ms,
        "device_kernel_ms_per_step_profiled": sum(r["device_self_us"] for r in kernels) / 1e3 / steps,
        "kernel_launches_per_step": launches / steps,
        "by_device_self": sorted(rows, key=lambda r: -r[key])[:top],
        "by_host_self": sorted(rows, key=lambda r: -r["host_self_us"])[:top],
    }


def main(argv: list[str] | None = None) -> None:
    d = E2ESettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--graph", action="store_true", help="profile steps replayed from CUDA graphs (see the docstring)"
    )
    p.add_argument("--output", type=Path, required=True)
    a = p.parse_args(argv)
    # The tiny run's model and calibration; steps are this script's own.
    values = {k: v for k, v in TINY_RUN.items() if k not in ("steps", "warmup")} if a.tiny else {}
    for k in ("batch", "context"):
        if getattr(a, k) is not None:
            values[k] = getattr(a, k)
    s = E2ESettings(arch=a.arch, device=a.device, dtype=a.dtype, **values)
    s.validate()
    model = build(s)
    ids = prompt_ids(model, s.batch, s.context, s.seed)
    res = {"settings": {"arch": s.arch, "batch": s.batch, "context": s.context, "dtype": s.dtype}}
    res["device"] = torch.cuda.get_device_name(0) if ids.is_cuda else "cpu"
    on_gpu = ids.is_cuda
    base_mode = "static_graph" if a.graph and on_gpu else "eager"
    res["baseline"] = profile_steps(model, ids, False, a.steps, a.top, base_mode)
    print(f"baseline: {res['baseline']['wall_ms_per_step']:.2f} ms/step", flush=True)
    compress_for_run(model, s)
    enable_latent_decode(model)
    res["latent"] = profile_steps(model, ids, True, a.steps, a.top, "graph" if a.graph else "eager")
    print(f"latent: {res['latent']['wall_ms_per_step']:.2f} ms/step", flush=True)
    for side in ("baseline", "latent"):
        r = res[side]
        print(
            f"{side}: wall {r['wall_ms_per_step']:.2f} ms/step, host issue {r['host_issue_ms_one_step']:.2f} ms, "
            f"kernels {r['device_kernel_ms_per_step_profiled']:.2f} ms, {r['kernel_launches_per_step']:.0f} launches"
        )
        for row in r["by_host_self"][:15]:
            print(
                f"   host {row['host_self_us'] / a.steps:9.1f} us/step  {row['calls'] // a.steps:5d}x  {row['name'][:70]}"
            )
        for row in r["by_device_self"][:10]:
            print(
                f"   dev  {row['device_self_us'] / a.steps:9.1f} us/step  {row['calls'] // a.steps:5d}x  {row['name'][:70]}"
            )
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
