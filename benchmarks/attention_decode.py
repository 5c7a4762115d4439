"""Decode-attention benchmark on one GPU: the latent kernel against SDPA on full K/V.

The measurement lives in :mod:`lowrank_kit.bench.kernel` (also behind ``lowrank bench speed``); see its
docstring for what is timed and how. This script parses the command line into its settings::

    python benchmarks/attention_decode.py run --out benchmarks/results/attention_decode_h200.json --sweep
    python benchmarks/attention_decode.py plot benchmarks/results/attention_decode_h200.json docs
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from lowrank_kit.bench.kernel import GRIDS, MODELS, RHOS, SWEEP_CLASS_NAMES, KernelSettings, plot, run


def parser() -> argparse.ArgumentParser:
    d = KernelSettings  # its defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure on the GPU and write JSON")
    r.add_argument("--out", required=True)
    r.add_argument("--batches", type=int, nargs="+", default=list(d.batches))
    r.add_argument("--lengths", type=int, nargs="+", default=list(d.lengths))
    r.add_argument(
        "--max-kv-gb", type=float, default=d.max_kv_gb, help="skip shapes whose full fp16 K/V exceed this"
    )
    r.add_argument("--sweep", action="store_true", help="also time launch configurations at the target shape")
    r.add_argument(
        "--sweep-classes",
        nargs="+",
        choices=SWEEP_CLASS_NAMES,
        default=None,
        help="time only these sweep classes (grouped: Qwen2-VL on the grouped kernel); default all",
    )
    r.add_argument(
        "--rhos", type=float, nargs="+", default=list(RHOS), help="ρ2 values of the latent variants"
    )
    r.add_argument(
        "--grid",
        choices=GRIDS,
        default=d.grid,
        help="cross: all lengths at batch 16 and all batches at 8192 tokens; full: every combination",
    )
    r.add_argument(
        "--time-budget", type=float, default=d.time_budget, help="stop the shape grid after this many seconds"
    )
    r.add_argument(
        "--skip-index-order",
        action="store_true",
        help="leave out the ragged_index variants (ragged heads by index, the layout before packing)",
    )
    r.add_argument(
        "--models",
        nargs="+",
        choices=tuple(MODELS),
        default=list(MODELS),
        help="attention shapes to time (default all); the launch sweep ignores it",
    )
    pl = sub.add_parser(
        "plot", help="write docs/kernel_latency.png and docs/kernel_table.md from JSON files of one device"
    )
    pl.add_argument("json", nargs="+", help="result files of `run` (say one per model of the full grid)")
    pl.add_argument("docs")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.cmd == "plot":
        plot(args.json, args.docs)
        return
    if not torch.cuda.is_available():
        sys.exit("attention_decode.py run needs a CUDA GPU")
    settings = KernelSettings(
        out=args.out,
        batches=args.batches,
        lengths=args.lengths,
        grid=args.grid,
        max_kv_gb=args.max_kv_gb,
        time_budget=args.time_budget,
        sweep=args.sweep,
        sweep_classes=args.sweep_classes,
        skip_index_order=args.skip_index_order,
    )
    models = {name: MODELS[name] for name in dict.fromkeys(args.models)}
    run(settings, models=models, rhos=tuple(args.rhos), say=partial(print, flush=True))


if __name__ == "__main__":
    main()
