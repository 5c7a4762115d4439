"""Decode-attention benchmark: the latent kernel against SDPA on full K/V, in one run on one GPU.

One invocation measures, at every shape (LLaVA-NeXT-7B attention: 32 query = 32 KV heads; Qwen2-VL-7B:
28 query over 4 KV heads with M-RoPE and a K bias; head_dim 128; batch 1/4/16/64; 1K-32K cached
tokens):

- a device-to-device copy (the bandwidth ceiling, bytes read + written),
- SDPA on full fp16 K/V with every backend that runs (default selection, flash, memory-efficient, cuDNN),
- the latent kernel at ρ2 = 0.9 / 0.7 / 0.5, uniform and allocator (ragged) ranks, fp16 and int8 latents
  (ragged per-head latents of MHA models in the runtime's packed head order, and as "ragged_index" in
  head order, the layout before packing),
- the same kernel with one shared latent at equal ρ2, and the naive PyTorch latent path.

Timing is device time: the median over replays of a CUDA graph that calls the operation on enough
distinct copies of its inputs that together they exceed four times the L2 cache (so no call reads a
warm cache), divided by the number of calls; the eager median of ``triton.testing.do_bench`` (host
launch overhead included when it exceeds the device time) is recorded beside it. Every kernel variant
is first checked against the naive fp32 twin on a 1000-token problem with ragged rows; a variant that
fails reports no speedup. ``sweep`` times launch configurations at the target shape (the tables in
``kernels/latent_attention/launch.py`` come from it). :func:`run` takes its settings as a
:class:`KernelSettings`, writes JSON, and :func:`plot` turns JSON files into the latency-vs-length figure
and the markdown table of docs/kernel.md. The script ``benchmarks/attention_decode.py`` parses the
command line into them::

    python benchmarks/attention_decode.py run --out benchmarks/results/attention_decode_h200.json --sweep
    python benchmarks/attention_decode.py plot benchmarks/results/attention_decode_h200.json docs
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowrank_kit.errors import LowRankError
from lowrank_kit.kernels.latent_attention import naive
from lowrank_kit.kernels.latent_attention.launch import LaunchConfig, grouped_launch_config
from lowrank_kit.kernels.latent_attention.testing import make_problem, relative_error, run_poisoned
from lowrank_kit.methods.allocation import importance_allocation
from lowrank_kit.models.presets import preset_config
from lowrank_kit.registry import adapter_for_config

MODELS = {
    "llava-next-7b": dict(num_heads=32, num_kv_heads=32, head_dim=128, bias=False, mrope_section=None),
    "qwen2-vl-7b": dict(num_heads=28, num_kv_heads=4, head_dim=128, bias=True, mrope_section=(16, 24, 24)),
}
RHOS = (0.9, 0.7, 0.5)
TARGET = dict(model="llava-next-7b", batch=16, length=8192, rho=0.5)
CHECK_TOL = {"fp16": 3e-3, "int8": 3e-3}  # same roundings as the CPU tests (fp16 operands, fp32 accumulation)
BATCHES = (1, 4, 16, 64)
LENGTHS = (1024, 4096, 8192, 32768)
GRIDS = ("cross", "full")


@dataclass
class KernelSettings:
    """What one run of :func:`run` measures and where it writes (see the module docstring).

    ``grid``: "cross" (every length at the target batch and every batch at the target length) or "full"
    (every combination of ``batches`` and ``lengths``); shapes whose full fp16 K/V exceed ``max_kv_gb``
    are skipped, and the grid stops after ``time_budget`` seconds. ``sweep`` also times launch
    configurations at the target shape (``sweep_classes``: only these, default all);
    ``skip_index_order`` leaves out the ragged_index variants (ragged heads by index, before packing).
    """

    out: Path | str
    batches: Sequence[int] = BATCHES
    lengths: Sequence[int] = LENGTHS
    grid: str = "cross"
    max_kv_gb: float = 18.0
    time_budget: float = 400.0
    sweep: bool = False
    sweep_classes: Sequence[str] | None = None
    skip_index_order: bool = False

    def validate(self) -> None:
        if self.grid not in GRIDS:
            raise LowRankError(f"unknown grid {self.grid!r}; available: {', '.join(GRIDS)}")
        for name in ("batches", "lengths"):
            values = list(getattr(self, name))
            if not values or any(v < 1 for v in values):
                raise LowRankError(f"{name} must be one or more positive integers, got {values}")
        unknown = sorted(set(self.sweep_classes or ()) - set(SWEEP_CLASS_NAMES))
        if unknown:
            raise LowRankError(
                f"unknown sweep class {unknown[0]!r}; available: {', '.join(SWEEP_CLASS_NAMES)}"
            )


def attention_shape(alias: str) -> dict[str, Any]:
    """The decode-attention shape of a preset (``lowrank models`` lists them), in :data:`MODELS`' form:
    query and KV heads, head_dim, K bias, M-RoPE sections and QK-norm, read from its config."""
    config = preset_config(alias)
    info = adapter_for_config(config).info(config)
    return dict(
        num_heads=info.num_heads,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        bias=info.k_bias,
        mrope_section=info.rope.mrope_section,
        qk_norm=info.qk_norm,
    )


def uniform_ranks(rho: float, heads: int, d: int) -> list[int]:
    return [round(rho * d)] * heads


def ragged_ranks(rho: float, heads: int, d: int, seed: int) -> list[int]:
    """Ranks from the importance allocator (granularity 8) on synthetic spectra that differ by head."""
    gen = torch.Generator().manual_seed(seed)
    decay = torch.rand(heads, generator=gen) * 40 + 8  # some heads concentrate their energy, some do not
    scores = [torch.exp(-torch.arange(d, dtype=torch.float64) / float(t)) for t in decay]
    kept = importance_allocation(scores, rho * heads * d, granularity=8, what="benchmark heads")
    return [len(k) for k in kept]


def problem(
    model: str | dict[str, Any],
    batch: int,
    length: int,
    ranks: tuple[list[int], list[int]],
    *,
    int8: bool,
    layout: str = "per_head",
    seed: int = 0,
    lengths: list[int] | None = None,
    left_pad: list[int] | None = None,
    positions: str = "sequential",
    head_order: str | None = None,
):
    """A decode problem at a benchmark shape; positions as in generation unless ``positions`` says
    "random" (see :func:`~lowrank_kit.kernels.latent_attention.testing.make_problem`). ``head_order``:
    None lays per-head latents out as the runtime does (packed for MHA), or "index" / "packed"."""
    m = MODELS[model] if isinstance(model, str) else model
    return make_problem(
        batch=batch,
        num_heads=m["num_heads"],
        num_kv_heads=m["num_kv_heads"],
        head_dim=m["head_dim"],
        k_ranks=ranks[0],
        v_ranks=ranks[1],
        lengths=lengths or [length] * batch,
        left_pad=left_pad,
        dtype=torch.float16,
        int8=int8,
        layout=layout,
        bias=m["bias"],
        mrope_section=m["mrope_section"],
        qk_norm=m.get("qk_norm"),
        positions=positions,
        # As the runtime lays out an MHA model's per-head latents (ragged ranks packed into programs).
        head_order=head_order
        or ("packed" if layout == "per_head" and m["num_heads"] == m["num_kv_heads"] else "index"),
        seed=seed,
        device="cuda",
    )


def bench(fn, rep: int = 100) -> float:
    """Eager median µs of ``fn`` (``do_bench`` flushes L2 between calls)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")) * 1e3


def copies_for(nbytes: int) -> int:
    """How many distinct input sets a timed graph cycles through so that they exceed 4× the L2."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(64, math.ceil(4 * l2 / max(nbytes, 1))))


def bench_graph(fns: list, rep: int = 100) -> float:
    """Device µs per call: CUDA-graph replays of ``fns`` (one call each, on distinct inputs) / len(fns)."""
    import triton

    for f in fns:
        f()
    torch.cuda.synchronize()

    def all_calls():
        for f in fns:
            f()

    return float(triton.testing.do_bench_cudagraph(all_calls, rep=rep, return_mode="median")) * 1e3 / len(fns)


def copy_bandwidth() -> float:
    """TB/s of a 2 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    # Eager: one 4 GiB copy dwarfs the launch; in a CUDA graph the copy becomes a memcpy node served
    # by the copy engines, which measured 2.8 TB/s against 4.3 TB/s for the SM copy kernel on an H200.
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / us / 1e6


def sdpa_backends() -> dict[str, Any]:
    found = {"default": None}
    for name, attr in (
        ("flash", "FLASH_ATTENTION"),
        ("efficient", "EFFICIENT_ATTENTION"),
        ("cudnn", "CUDNN_ATTENTION"),
    ):
        if hasattr(SDPBackend, attr):
            found[name] = getattr(SDPBackend, attr)
    return found


def time_sdpa(model: str | dict[str, Any], batch: int, length: int) -> dict[str, Any]:
    """Device µs of one decode step of SDPA on full fp16 K/V, per backend (a reason where one refuses)."""
    m = MODELS[model] if isinstance(model, str) else model
    hq, hkv, d = m["num_heads"], m["num_kv_heads"], m["head_dim"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = copies_for(2 * batch * hkv * length * d * 2)
    sets = [
        (
            torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16, generator=gen),
            torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.float16, generator=gen),
            torch.randn(batch, hkv, length, d, device="cuda", dtype=torch.float16, generator=gen),
        )
        for _ in range(n)
    ]
    gqa = {"enable_gqa": True} if hq != hkv else {}
    out: dict[str, Any] = {}
    for name, backend in sdpa_backends().items():

        def call(q, k, v, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, **gqa)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, **gqa)

        try:
            out[name] = bench_graph([partial(call, *qkv) for qkv in sets])
        except RuntimeError as err:  # a backend that does not take this shape: recorded, not timed
            out[name] = f"unsupported: {str(err).splitlines()[0][:120]}"
    del sets
    torch.cuda.empty_cache()
    return out


def _error_vs_naive(p, config=None) -> float:
    """Relative error of the kernel against its naive twin on problem ``p``; the output buffer and the
    split partials start as NaN, so an entry nobody wrote fails the comparison."""
    return relative_error(
        run_poisoned(p, config), naive.latent_attention_decode(p.q, p.kv, p.w, p.starts, p.ends)
    )


def check_variant(
    model: str | dict[str, Any], ranks, *, int8: bool, layout: str, head_order: str | None = None
) -> tuple[bool, float]:
    """Kernel vs naive twin on 1000 tokens, ragged rows and left padding, NaN-poisoned buffers."""
    worst = 0.0
    # Positions as in generation (slot minus left padding) and random up to 30000 (large angles).
    for seed, positions in ((0, "sequential"), (1, "random")):
        p = problem(
            model,
            3,
            1000,
            ranks,
            int8=int8,
            layout=layout,
            seed=seed,
            lengths=[1000, 517, 1],
            left_pad=[0, 301, 999],
            positions=positions,
            head_order=head_order,
        )
        worst = max(worst, _error_vs_naive(p))
    return worst < CHECK_TOL["int8" if int8 else "fp16"], worst


def kernel_fn(p, max_len: int, config: LaunchConfig | None = None):
    from lowrank_kit.kernels.latent_attention import triton as triton_impl  # Triton: only where it runs

    def fn():
        return triton_impl.latent_attention_decode(
            p.q, p.kv, p.w, p.starts, p.ends, max_len=max_len, config=config
        )

    return fn


# Launch sweep: (heads per program, block_n, num_warps, num_stages[, maxnreg[, split_len]]) for the
# per-head kernel (0 heads per program = the grouped kernel). Per class, the grouped kernel's table entry
# is the baseline. "occupancy": register caps that fit three or four programs per SM (with the shared
# memory each needs, compiled for sm_90: 2 heads, BN 64, 1 stage 55 KB; BN 32, 2 stages 63 KB; 1 head,
# BN 64, 2 stages 45 KB) against the table's launch, and split lengths around the default (3 splits).
_HEADS_SWEEP = {
    "fp16": [(hb, *cfg) for hb in (1, 2, 4) for cfg in ((64, 4, 2), (64, 4, 3), (128, 8, 2), (64, 8, 2))],
    "int8": [(hb, *cfg) for hb in (1, 2) for cfg in ((64, 4, 2), (64, 4, 3), (128, 8, 2), (64, 8, 2))],
    "ragged": [(hb, *cfg) for hb in (1, 2) for cfg in ((64, 4, 2), (128, 8, 2), (64, 8, 2))],
    "wide": [(1, 64, 4, 2), (1, 128, 8, 2), (1, 64, 8, 2), (2, 64, 8, 2)],
    "occupancy": [
        (2, 64, 4, 2),
        (2, 64, 4, 2, 0, 1024),
        (2, 64, 4, 2, 0, 4096),
        (2, 64, 4, 2, 168),
        (2, 64, 4, 1, 168),
        (2, 64, 4, 1, 168, 1024),
        (2, 32, 4, 2, 168),
        (2, 32, 4, 2, 168, 1024),
        (1, 64, 4, 2),
        (1, 64, 4, 2, 128),
        (1, 64, 4, 2, 128, 1024),
        (1, 64, 4, 3, 128),
    ],
    # The grouped kernel on Qwen2-VL's GQA shape (0 heads a program): tiles, warps, stages, register caps
    # (255 registers and a small spill uncapped, 73 KB shared: a cap of 168 fits three programs per SM).
    "grouped_gqa": [
        (0, 64, 4, 2),
        (0, 64, 4, 4),
        (0, 32, 4, 3),
        (0, 32, 4, 4),
        (0, 128, 8, 3),
        (0, 64, 8, 3),
        (0, 64, 4, 3, 168),
        (0, 64, 4, 2, 168),
        (0, 32, 4, 3, 168),
        (0, 64, 4, 3, 0, 512),
        (0, 64, 4, 3, 0, 2048),
    ],
    "occupancy_int8": [
        (2, 64, 4, 2),
        (2, 64, 4, 2, 168),
        (2, 64, 4, 2, 168, 1024),
        (1, 64, 4, 2),
        (1, 64, 4, 2, 128),
        (1, 64, 4, 2, 128, 1024),
    ],
}
# The classes a sweep can be restricted to (grouped: Qwen2-VL on the grouped kernel's table launch).
SWEEP_CLASS_NAMES = (*_HEADS_SWEEP, "grouped")
SWEEP_CLASSES = (
    # (model, ρ2, dtype, ranks, configs)
    ("llava-next-7b", 0.5, "fp16", "uniform", "fp16"),
    ("llava-next-7b", 0.5, "int8", "uniform", "int8"),
    ("llava-next-7b", 0.5, "fp16", "ragged", "ragged"),
    ("llava-next-7b", 0.9, "fp16", "uniform", "wide"),
    ("qwen2-vl-7b", 0.5, "fp16", "uniform", None),
    ("llava-next-7b", 0.5, "fp16", "uniform", "occupancy"),
    ("llava-next-7b", 0.5, "int8", "uniform", "occupancy_int8"),
    ("qwen2-vl-7b", 0.5, "fp16", "uniform", "grouped_gqa"),
)


def _sweep_entry(c: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """A sweep entry with its optional maxnreg and split length (0: the compiler's, the launcher's)."""
    hb, bn, warps, stages, maxnreg, split = (*c, 0, 0)[:6]
    return hb, bn, warps, stages, maxnreg, split


def _config_ok(model: str, ranks, int8: bool, cfg) -> tuple[bool, float]:
    """One launch configuration (its split length 0: chosen for this problem) against the naive twin
    (2 rows, 1000 and 517 tokens, left padding; positions as in generation, then random)."""
    err = 0.0
    for positions in ("sequential", "random"):
        p = problem(
            model,
            2,
            1000,
            ranks,
            int8=int8,
            seed=7,
            lengths=[1000, 517],
            left_pad=[0, 301],
            positions=positions,
        )
        err = max(err, _error_vs_naive(p, cfg))
    return err < CHECK_TOL["int8" if int8 else "fp16"], err


def sweep(
    copy: float, say=print, rows: list | None = None, save=None, classes: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Time launch configurations of both kernels at the target shape (Qwen2-VL at batch 64); every
    configuration is first checked against the naive twin, and one that fails is not timed. Rows are
    appended to ``rows`` (returned) and ``save`` is called after each, so a stopped sweep keeps its rows."""
    rows = [] if rows is None else rows
    for model, rho, dt, kind, configs in SWEEP_CLASSES:
        if classes is not None and (configs or "grouped") not in classes:
            continue
        m = MODELS[model]
        hkv, d = m["num_kv_heads"], m["head_dim"]
        if kind == "ragged":
            ranks = (ragged_ranks(rho, hkv, d, 1), ragged_ranks(rho, hkv, d, 2))
        else:
            ranks = (uniform_ranks(rho, hkv, d), uniform_ranks(rho, hkv, d))
        b = 16 if model == "llava-next-7b" else 64
        int8 = dt == "int8"
        p = problem(model, b, 8192, ranks, int8=int8)
        base = dataclasses.replace(grouped_launch_config(b, hkv, 8192, p.w, p.q.device), split_len=0)
        candidates = [base] + [
            # 0 heads a program: the grouped kernel with the base's rank and V chunks.
            dataclasses.replace(
                base, block_n=bn, num_warps=warps, num_stages=stages, split_len=split, maxnreg=maxnreg
            )
            if hb == 0
            else LaunchConfig(bn, warps, stages, 0, 0, split, hb, maxnreg=maxnreg)
            for hb, bn, warps, stages, maxnreg, split in map(_sweep_entry, _HEADS_SWEEP.get(configs, ()))
        ]
        for cfg in candidates:
            row = dict(
                model=model,
                rho=rho,
                dtype=dt,
                ranks=kind,
                batch=b,
                kernel="heads" if cfg.heads_per_program else "grouped",
                heads_per_program=cfg.heads_per_program,
                block_n=cfg.block_n,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                maxnreg=cfg.maxnreg,
                split_len=cfg.split_len,
            )
            try:
                ok, err = _config_ok(model, ranks, int8, cfg)
                row.update(check_ok=ok, rel_err=err)
                if ok:
                    row["us"] = us = bench_graph([kernel_fn(p, 8192, cfg)], rep=50)
                    row.update(kernel_row(p, us, copy))
            except Exception as exc:  # out of shared memory or registers: recorded, not timed
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            say(f"sweep {row}")
            if save is not None:
                save()
        del p
        torch.cuda.empty_cache()
    return rows


def kernel_row(p, fn_us: float, copy_tbs: float) -> dict[str, Any]:
    nbytes = p.latent_bytes()
    gbs = nbytes / fn_us / 1e3
    return {"us": fn_us, "bytes": nbytes, "GB_s": gbs, "frac_copy": gbs / (copy_tbs * 1e3)}


def grid_shapes(settings: KernelSettings) -> list[tuple[int, int]]:
    """(batch, tokens) pairs: every combination (``full``), or every length at the target batch and
    every batch at the target length (``cross``)."""
    if settings.grid == "full":
        return [(b, n) for b in settings.batches for n in settings.lengths]
    tb, tn = TARGET["batch"], TARGET["length"]
    return [(tb, n) for n in settings.lengths] + [(b, tn) for b in settings.batches if b != tb]


def run(
    settings: KernelSettings,
    models: dict[str, dict[str, Any]] | None = None,
    rhos: tuple[float, ...] = RHOS,
    say=print,
) -> dict[str, Any]:
    """Measure and write ``settings.out`` (JSON, rewritten after every shape); returns the results.

    ``models``: name → shape as in :data:`MODELS` (the default); ``rhos``: the ρ2 values of the latent
    variants; ``say``: where progress lines go. The launch sweep (``settings.sweep``) runs on
    :data:`MODELS`' shapes only.
    """
    settings.validate()
    import triton  # Triton: only where the benchmark runs

    t0 = time.time()
    target = (TARGET["batch"], TARGET["length"])
    out_path = Path(settings.out)
    res: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "timing": "µs per call: median over CUDA-graph replays of calls on distinct input copies that together "
        "exceed 4x the L2 cache (bench_graph); us_eager: triton.testing.do_bench median at the target shape",
        "rows": [],
        "checks": {},
        "sweep": [],
    }

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=1))

    models = MODELS if models is None else models
    res["models"] = {name: dict(m) for name, m in models.items()}
    res["copy_TB_s"] = copy = copy_bandwidth()
    say(f"copy bandwidth {copy:.2f} TB/s")

    variants = []
    for model, m in models.items():
        hkv, d = m["num_kv_heads"], m["head_dim"]
        for rho in rhos:
            uni = (uniform_ranks(rho, hkv, d), uniform_ranks(rho, hkv, d))
            rag = (ragged_ranks(rho, hkv, d, 1), ragged_ranks(rho, hkv, d, 2))
            for mode, ranks in (("uniform", uni), ("ragged", rag)):
                for dt in ("fp16", "int8"):
                    variants.append(
                        dict(model=model, rho=rho, ranks=mode, dtype=dt, layout="per_head", r=ranks)
                    )
            if m["num_heads"] == hkv and not settings.skip_index_order:
                # Ragged heads laid out by index (before the runtime packed them): the packing's gain.
                for dt in ("fp16", "int8"):
                    variants.append(
                        dict(
                            model=model, rho=rho, ranks="ragged_index", dtype=dt, layout="per_head", r=rag,
                            head_order="index",
                        )
                    )  # fmt: skip
            shared = ([round(rho * hkv * d)], [round(rho * hkv * d)])
            variants.append(
                dict(model=model, rho=rho, ranks="shared", dtype="fp16", layout="shared", r=shared)
            )

    for v in variants:
        key = f"{v['model']}|{v['rho']}|{v['ranks']}|{v['dtype']}"
        try:
            ok, err = check_variant(
                models[v["model"]],
                v["r"],
                int8=v["dtype"] == "int8",
                layout=v["layout"],
                head_order=v.get("head_order"),
            )
        except Exception as exc:  # a compile or launch failure is a failed check, reported with its reason
            ok, err = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        res["checks"][key] = {"ok": ok, "rel_err": err}
        say(f"check {key}: {'ok' if ok else 'FAILED'} ({err})")
    save()

    if settings.sweep:
        sweep(copy, say, rows=res["sweep"], save=save, classes=settings.sweep_classes)

    for model, m in models.items():
        hq, hkv, d = m["num_heads"], m["num_kv_heads"], m["head_dim"]
        for batch, length in grid_shapes(settings):
            full_bytes = 2 * batch * hkv * length * d * 2
            if full_bytes > settings.max_kv_gb * 1e9:
                res.setdefault("skipped", []).append(
                    f"{model} B={batch} S={length}: full K/V {full_bytes / 1e9:.1f} GB > --max-kv-gb {settings.max_kv_gb}"
                )
                continue
            if time.time() - t0 > settings.time_budget:
                res["truncated"] = (
                    f"stopped at {model} B={batch} S={length}: time budget {settings.time_budget}s"
                )
                save()
                say(res["truncated"])
                return res
            sd = time_sdpa(m, batch, length)
            timed = {k: t for k, t in sd.items() if isinstance(t, float)}
            best_name = min(timed, key=timed.get) if timed else None
            best = timed[best_name] if best_name else math.nan
            base = dict(model=model, batch=batch, length=length, heads=hq, kv_heads=hkv, head_dim=d)
            res["rows"].append(
                {
                    **base,
                    "impl": "sdpa",
                    "backends": sd,
                    "best_backend": best_name,
                    "us": best,
                    "bytes": full_bytes,
                    "GB_s": full_bytes / best / 1e3,
                    "frac_copy": full_bytes / best / 1e3 / (copy * 1e3),
                }
            )
            say(f"{model} B={batch} S={length} sdpa {sd}")
            for v in variants:
                if v["model"] != model:
                    continue
                if v["layout"] == "shared" and (batch > 16 or length > 8192):
                    continue  # 30x the reconstruction work of per-head latents: minutes at the big shapes
                key = f"{v['model']}|{v['rho']}|{v['ranks']}|{v['dtype']}"
                make = partial(
                    problem,
                    m,
                    batch,
                    length,
                    v["r"],
                    int8=v["dtype"] == "int8",
                    layout=v["layout"],
                    head_order=v.get("head_order"),
                )
                p = make()
                ps = [p] + [make(seed=i) for i in range(1, copies_for(p.latent_bytes()))]
                try:
                    us = bench_graph([kernel_fn(x, length) for x in ps])
                    us_eager = bench(kernel_fn(p, length)) if (batch, length) == target else None
                except Exception as exc:  # reported with its reason, not timed
                    say(f"{key} B={batch} S={length}: {type(exc).__name__}: {exc}")
                    continue
                del ps
                row = {
                    **base,
                    "impl": "latent",
                    "rho": v["rho"],
                    "ranks": v["ranks"],
                    "dtype": v["dtype"],
                    "k_ranks": v["r"][0],
                    "v_ranks": v["r"][1],
                    **kernel_row(p, us, copy),
                    "us_eager": us_eager,
                }
                checked = res["checks"][key]["ok"]
                row["check_ok"] = checked
                row["speedup_vs_best_sdpa"] = best / us if checked else None
                res["rows"].append(row)
                say(
                    f"  {key}: {us:.1f} us, {row['GB_s']:.0f} GB/s ({row['frac_copy']:.0%} of copy), "
                    f"x{best / us:.2f} vs {best_name}"
                )
                if (
                    v["ranks"] == "uniform"
                    and v["dtype"] == "fp16"
                    and v["rho"] == 0.5
                    and batch <= 16
                    and length <= 8192
                ):
                    naive_row = {**base, "impl": "naive", "rho": 0.5, "ranks": "uniform", "dtype": "fp16"}
                    try:
                        naive_row["us"] = bench(
                            partial(naive.latent_attention_decode, p.q, p.kv, p.w, p.starts, p.ends),
                            rep=50,
                        )
                        naive_row["bytes"] = p.latent_bytes()
                    except torch.OutOfMemoryError:
                        naive_row["us"] = None
                        naive_row["note"] = "out of GPU memory (the naive path rebuilds K/V in fp32)"
                    res["rows"].append(naive_row)
                del p
                torch.cuda.empty_cache()
            save()
    res["elapsed_s"] = time.time() - t0
    save()
    summarize(res, say)
    return res


def summarize(res: dict[str, Any], say=print) -> None:
    rows = res["rows"]
    t = TARGET
    sd = [
        r
        for r in rows
        if r["impl"] == "sdpa"
        and r["model"] == t["model"]
        and r["batch"] == t["batch"]
        and r["length"] == t["length"]
    ]
    for r in rows:
        if (
            r["impl"] == "latent"
            and r["model"] == t["model"]
            and r["batch"] == t["batch"]
            and r["length"] == t["length"]
            and r["rho"] == t["rho"]
        ):
            say(
                f"TARGET {r['ranks']:8s} {r['dtype']}: {r['us']:.1f} us, {r['frac_copy']:.0%} of copy, "
                f"speedup {r['speedup_vs_best_sdpa']}"
            )
    if sd:
        say(f"TARGET sdpa best {sd[0]['best_backend']}: {sd[0]['us']:.1f} us  backends {sd[0]['backends']}")


# -- docs: table and plot from JSON files -----------------------------------------------------------------
def load_results(paths: Sequence[str]) -> dict[str, Any]:
    """One result from one or more JSON files of ``run`` (say one per model of the full grid): their
    rows together. The files must come from the same device, or their timings would not compare."""
    results = []
    for p in paths:
        try:
            results.append(json.loads(Path(p).read_text()))
        except FileNotFoundError:
            raise SystemExit(
                f"{p}: no such file (a JSON file written by `attention_decode.py run`)"
            ) from None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{p}: not a JSON file of `attention_decode.py run` ({exc})") from None
        if not isinstance(results[-1], dict) or "rows" not in results[-1] or "device" not in results[-1]:
            raise SystemExit(f"{p}: not a result of `attention_decode.py run` (no 'rows' and 'device')")
    devices = {r["device"] for r in results}
    if len(devices) > 1:
        raise SystemExit(f"results from different devices do not compare: {sorted(devices)} in {paths}")
    merged = dict(results[0])
    merged["rows"] = [row for r in results for row in r["rows"]]
    merged["skipped"] = [s for r in results for s in r.get("skipped", [])]
    return merged


# Latency series of the plot: label → (impl, ρ2, ranks, dtype); None matches anything.
_PLOT_SERIES = {
    "best SDPA (full K/V)": ("sdpa", None, None, None),
    "latent fp16 ρ2=0.5": ("latent", 0.5, "uniform", "fp16"),
    "latent fp16 ρ2=0.7": ("latent", 0.7, "uniform", "fp16"),
    "latent fp16 ρ2=0.9": ("latent", 0.9, "uniform", "fp16"),
    "latent fp16 ρ2=0.5 ragged": ("latent", 0.5, "ragged", "fp16"),
    "latent int8 ρ2=0.5": ("latent", 0.5, "uniform", "int8"),
    "shared latent fp16 ρ2=0.5": ("latent", 0.5, "shared", "fp16"),
}


def _matches(row: dict[str, Any], impl: str, rho, ranks, dtype) -> bool:
    return (
        row["impl"] == impl
        and (rho is None or row.get("rho") == rho)
        and (ranks is None or row.get("ranks") == ranks)
        and (dtype is None or row.get("dtype") == dtype)
    )


def speedup_matrix(rows: list[dict[str, Any]], model: str, rho: float, ranks: str, dtype: str) -> list[str]:
    """Markdown table of the latent kernel's speedup over the best SDPA backend, batch × tokens (no lines
    when the run has no such variant)."""
    sel = [r for r in rows if r["model"] == model and _matches(r, "latent", rho, ranks, dtype)]
    if not sel:
        return []
    batches = sorted({r["batch"] for r in sel})
    lengths = sorted({r["length"] for r in sel})
    cell = {(r["batch"], r["length"]): r for r in sel}

    def fmt(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        sp = r["speedup_vs_best_sdpa"]
        return "check failed" if sp is None else f"{sp:.2f}× ({r['frac_copy']:.0%})"

    lines = [
        "| batch | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(fmt(cell.get((b, n))) for n in lengths) + " |")
    return lines


def plot(paths: Sequence[str], docs: str, say=print) -> None:
    """Write ``docs``/kernel_latency.png and ``docs``/kernel_table.md from the JSON files of :func:`run`
    at ``paths`` (one device; see :func:`load_results`)."""
    import matplotlib  # an optional dependency: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = load_results(paths)
    rows = res["rows"]
    docs_dir = Path(docs)
    # One panel per model and batch that the run measured at two or more lengths (a model the run did
    # not reach, or a batch of the cross grid's single length, gets no empty panel).
    panels = [
        (m, b)
        for m in MODELS
        for b in sorted({r["batch"] for r in rows if r["model"] == m})
        if len({r["length"] for r in rows if r["model"] == m and r["batch"] == b}) > 1
    ]
    if not panels:
        raise SystemExit(f"{', '.join(paths)}: no batch measured at two or more lengths to plot")
    models = list(dict.fromkeys(m for m, _ in panels))
    cols = max(sum(1 for m2, _ in panels if m2 == m) for m in models)
    fig, axes = plt.subplots(len(models), cols, figsize=(4.6 * cols, 3.9 * len(models)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, model in enumerate(models):
        for k, (_, batch) in enumerate(p for p in panels if p[0] == model):
            ax = axes[i][k]
            ax.set_visible(True)
            sel = [r for r in rows if r["model"] == model and r["batch"] == batch]
            for label, spec in _PLOT_SERIES.items():
                pts = sorted((r for r in sel if _matches(r, *spec)), key=lambda r: r["length"])
                if pts:
                    ax.plot([r["length"] for r in pts], [r["us"] for r in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("cached tokens")
            ax.set_ylabel("µs per decode step (one layer)")
            ax.set_title(f"{model}, batch {batch}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode attention on {res['device']} (median of CUDA-graph replays)")
    fig.tight_layout()
    fig.savefig(docs_dir / "kernel_latency.png", dpi=110)

    lines = [
        f"<!-- generated by `python benchmarks/attention_decode.py plot {' '.join(paths)} {docs}` -->",
        "",
        f"Device: {res['device']}; copy ceiling {res['copy_TB_s']:.2f} TB/s. Speedup of the latent kernel over "
        "the best SDPA backend on full fp16 K/V, and in parentheses the fraction of the copy bandwidth "
        "on the bytes it reads. —: not in the run (a shape whose full fp16 K/V exceed the run's "
        "`--max-kv-gb` is skipped" + (f": {'; '.join(res['skipped'])})." if res.get("skipped") else ")."),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for rho in sorted({r["rho"] for r in rows if r["model"] == model and r["impl"] == "latent"}):
            for ranks, dtype in (
                ("uniform", "fp16"),
                ("uniform", "int8"),
                ("ragged", "fp16"),
                ("ragged", "int8"),
            ):
                matrix = speedup_matrix(rows, model, rho, ranks, dtype)
                if matrix:
                    lines += ["", f"**{model}, ρ2 = {rho}, {ranks} ranks, {dtype} latents**", "", *matrix]
    lines += [
        "",
        "Every row:",
        "",
        "| model | batch | tokens | impl | ρ2 | ranks | latents | µs | GB/s | of copy | vs best SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["impl"] == "sdpa":
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['length']} | SDPA ({r['best_backend']}) | 1 | | fp16 "
                f"| {r['us']:.1f} | {r['GB_s']:.0f} | {r['frac_copy']:.0%} | 1.00× |"
            )
        elif r["impl"] == "latent":
            sp = r["speedup_vs_best_sdpa"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['length']} | latent | {r['rho']} | {r['ranks']} | "
                f"{r['dtype']} | {r['us']:.1f} | {r['GB_s']:.0f} | {r['frac_copy']:.0%} | "
                f"{'n/a (check failed)' if sp is None else f'{sp:.2f}×'} |"
            )
        elif r["impl"] == "naive":
            us = r.get("us")
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['length']} | naive PyTorch | 0.5 | uniform | fp16 "
                f"| {'out of memory' if us is None else f'{us:.1f}'} | | | |"
            )
    (docs_dir / "kernel_table.md").write_text("\n".join(lines) + "\n")
    say(f"wrote {docs_dir / 'kernel_latency.png'} and {docs_dir / 'kernel_table.md'}")
