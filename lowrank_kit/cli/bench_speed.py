"""``lowrank bench speed``: decode-attention and end-to-end decode speed of a real architecture with
random weights, on the GPU of this machine.

It wraps the two benchmarks: :mod:`lowrank_kit.bench.kernel` (the latent kernel against
SDPA on full K/V at the preset's attention shape, with a device-to-device copy as the ceiling) and
:mod:`lowrank_kit.bench.e2e` (tokens/s of the uncompressed model on transformers against ``wsvd``
decoding from latents). Both need CUDA; without it the command says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lowrank_kit.cli.bench import bench_app
from lowrank_kit.cli.common import err_console, out, print_json
from lowrank_kit.errors import LowRankError


def _positive_ints(text: str, flag: str) -> list[int]:
    from lowrank_kit.recipe import parse_list

    values = parse_list(text, flag)
    if not all(v.isdigit() and int(v) >= 1 for v in values):
        raise LowRankError(f"{flag} takes comma-separated positive integers, e.g. 8,16; got {text!r}")
    return [int(v) for v in values]


def _kernel_table(res: dict[str, Any]) -> Table:
    table = Table(title=f"decode attention, one layer ({res['device']}, copy {res['copy_TB_s']:.2f} TB/s)")
    for col in ("batch", "tokens", "impl", "ρ2", "ranks", "latents", "µs", "of copy", "vs best SDPA"):
        table.add_column(col, justify="left" if col in ("impl", "ranks", "latents") else "right")
    for r in res["rows"]:
        if r["impl"] == "sdpa":
            table.add_row(
                str(r["batch"]), str(r["length"]), f"SDPA ({r['best_backend']})", "1", "", "fp16",
                f"{r['us']:.1f}", f"{r['frac_copy']:.0%}", "1.00×",
            )  # fmt: skip
        elif r["impl"] == "latent":
            sp = r["speedup_vs_best_sdpa"]
            table.add_row(
                str(r["batch"]), str(r["length"]), "latent", f"{r['rho']:g}", r["ranks"], r["dtype"],
                f"{r['us']:.1f}", f"{r['frac_copy']:.0%}", "n/a (check failed)" if sp is None else f"{sp:.2f}×",
            )  # fmt: skip
    return table


def _e2e_table(res: dict[str, Any]) -> Table:
    s = res["settings"]
    table = Table(
        title=f"end-to-end decode, {s['arch']} {s['dtype']}, {s['steps']} steps ({res['device']}); "
        f"{s['method']} ρ1={s['ratio']} → ρ2={res['compression']['rho2']:.3f}"
    )
    rows = res["rows"]
    graph = bool(s.get("graph"))
    static = any("baseline_static_graph" in r for r in rows)
    check_ok = res["check"].get("ok", False)

    def rate(side: dict[str, Any] | None) -> str:
        if side is None:
            return "-"
        return "out of memory" if "error" in side else f"{side['decode_tokens_per_s']:.1f}"

    def ratio(sp: float | None) -> str:
        return f"{sp:.2f}×" if sp is not None else ("n/a" if check_ok else "n/a (check failed)")

    def peak(side: dict[str, Any]) -> str:
        n = side.get("peak_gpu_memory_bytes")
        return "-" if n is None else f"{n / 2**30:.1f}"

    # (column, cell of a row, shown): the graph columns only when the run replayed graphs, the reference's
    # only when it was timed.
    columns = [
        ("batch", lambda r: str(r["batch"]), True),
        ("context", lambda r: str(r["context"]), True),
        ("HF tok/s", lambda r: rate(r["baseline"]), True),
        ("HF static+graph tok/s", lambda r: rate(r.get("baseline_static_graph")), static),
        ("latent eager tok/s", lambda r: rate(r["latent_eager"]), graph),
        ("latent graph tok/s" if graph else "latent tok/s", lambda r: rate(r["latent"]), True),
        ("speedup", lambda r: ratio(r["speedup"]), True),
        ("speedup eager", lambda r: ratio(r["speedup_eager"]), graph),
        ("vs static+graph", lambda r: ratio(r.get("speedup_vs_static_graph")), static),
        ("HF peak GiB", lambda r: peak(r["baseline"]), True),
        ("latent peak GiB", lambda r: peak(r["latent"]), True),
    ]
    columns = [(name, cell) for name, cell, shown in columns if shown]
    for name, _ in columns:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    return table


@bench_app.command("speed")
def speed(
    arch: str = typer.Option(
        ..., "--arch", "-a", help="Required: a preset alias (see `lowrank models`), e.g. llava-next-7b."
    ),
    batch: str = typer.Option("8", "--batch", "-b", help="Comma-separated batch sizes."),
    seq: str = typer.Option("8192", "--seq", "-s", help="Comma-separated cached tokens (context lengths)."),
    rho2: str = typer.Option(
        "0.5", "--rho2", help="Comma-separated ρ2 (fraction of the K/V cache kept) of the kernel's latents."
    ),
    ratio: float = typer.Option(0.5, "--ratio", help="ρ1 of the end-to-end run's wsvd compression."),
    quant: str | None = typer.Option(
        None,
        "--quant",
        help="End to end: a quantization scheme after wsvd, e.g. w8a16-kv8 (int8 weights computed from "
        "their integers, int8 latents).",
    ),
    steps: int = typer.Option(32, "--steps", help="Timed decode steps of the end-to-end run."),
    kernel: bool = typer.Option(True, "--kernel/--no-kernel", help="Run the decode-attention benchmark."),
    e2e: bool = typer.Option(True, "--e2e/--no-e2e", help="Run the end-to-end decode benchmark."),
    graph: bool = typer.Option(
        True,
        "--graph/--no-graph",
        help="End to end: also replay the latent decode steps from a CUDA graph (the speedup's row); "
        "eager steps are always timed.",
    ),
    static_baseline: bool = typer.Option(
        True,
        "--static-baseline/--no-static-baseline",
        help="End to end: also time the uncompressed model with transformers' StaticCache replayed from a "
        "CUDA graph, as a reference for what graph capture alone gives.",
    ),
    time_budget: float = typer.Option(
        400.0, "--time-budget", help="Seconds after which the kernel benchmark stops adding shapes."
    ),
    output: Path = typer.Option(
        Path("bench-speed"), "--output", "-o", help="Directory for kernel.json and e2e.json.", file_okay=False
    ),
    as_json: bool = typer.Option(False, "--json", help='Print {"kernel": {...}, "e2e": {...}} as JSON.'),
) -> None:
    """Decode speed of ARCH with random weights: the latent kernel against SDPA, then end to end."""
    import torch

    from lowrank_kit.models.presets import get_preset

    get_preset(arch)  # an unknown alias is an error that lists the valid ones
    batches, lengths = _positive_ints(batch, "--batch"), _positive_ints(seq, "--seq")
    from lowrank_kit.recipe import RHO1_MEANING, check_fraction, parse_fractions

    rhos = tuple(parse_fractions(rho2, "--rho2"))
    check_fraction(ratio, "--ratio", RHO1_MEANING)
    if quant is not None:
        from lowrank_kit.quant.schemes import resolve_scheme

        resolve_scheme(quant)  # an unknown scheme is an error that lists the valid forms
    if steps < 1:
        raise LowRankError(f"--steps must be at least 1, got {steps}")
    if not (kernel or e2e):
        raise LowRankError("--no-kernel and --no-e2e together leave nothing to run; drop one of them")
    if not torch.cuda.is_available():
        raise LowRankError(
            "lowrank bench speed needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is "
            "False); run it on a machine with an NVIDIA GPU"
        )
    # The benchmarks import the model code, transformers and the runtime: only once there is work to do.
    from lowrank_kit.bench.e2e import E2ESettings, run_e2e
    from lowrank_kit.bench.kernel import KernelSettings, attention_shape, run

    def say(line: str) -> None:
        err_console.print(line, markup=False, highlight=False)

    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if kernel:
        kernel_settings = KernelSettings(
            out=output / "kernel.json",
            batches=batches,
            lengths=lengths,
            grid="full",
            max_kv_gb=float("inf"),
            time_budget=time_budget,
        )
        results["kernel"] = run(kernel_settings, models={arch: attention_shape(arch)}, rhos=rhos, say=say)
    if e2e:
        settings = E2ESettings(
            arch=arch,
            batch=batches[0],
            context=lengths[0],
            steps=steps,
            ratio=ratio,
            quant=quant,
            graph=graph,
            static_baseline=static_baseline,
        )
        res = run_e2e(settings, shapes=[(b, n) for b in batches for n in lengths], say=say)
        (output / "e2e.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        results["e2e"] = res
    if as_json:
        print_json(results)
        return
    if kernel:
        out.print(_kernel_table(results["kernel"]))
    if e2e:
        out.print(_e2e_table(results["e2e"]))
    out.print(f"results: {output}")
