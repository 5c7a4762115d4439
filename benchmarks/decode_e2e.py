"""End-to-end decode tokens/s: the uncompressed model on transformers (SDPA, DynamicCache) against wsvd
at ρ1 = 0.5 decoding from latents, with random weights on one GPU.

The latent side is timed twice: with eager decode steps and with the steps replayed from a CUDA graph
(the speedup's row; ``--no-graph`` leaves it out); the uncompressed model is also timed with
transformers' StaticCache replayed from a CUDA graph, as a reference (``--no-static-baseline``).

The measurement lives in :mod:`lowrank_kit.bench.e2e` (also behind ``lowrank bench speed``); see its
docstring for what is timed and how. The issue's target shape is the default (LLaVA-NeXT-7B, fp16,
batch 8, 8192-token context)::

    python benchmarks/decode_e2e.py --output benchmarks/results/decode_e2e_llava-next-7b_h200.json
    python benchmarks/decode_e2e.py --tiny --device cpu --dtype float32 --output /tmp/e2e.json  # smoke run

``--tiny`` shrinks the architecture (2 layers, widths and heads / 16, head_dim kept) and the run (batch 2,
256 tokens, 4 steps, 2 calibration samples of 64 tokens); explicit options override it. The script exits
1 when the latent check fails (the JSON is still written, with no speedup).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowrank_kit.bench.e2e import DTYPES, TINY_RUN, E2ESettings, run_e2e, summary_line
from lowrank_kit.errors import LowRankError


def parse(argv: list[str] | None) -> tuple[E2ESettings, Path | None]:
    d = E2ESettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=d.arch, help="preset alias (lowrank models lists them)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=None, help=f"rows (default {d.batch})")
    p.add_argument("--context", type=int, default=None, help=f"prompt tokens per row (default {d.context})")
    p.add_argument("--steps", type=int, default=None, help=f"timed decode steps (default {d.steps})")
    p.add_argument(
        "--warmup", type=int, default=None, help=f"untimed decode steps first (default {d.warmup})"
    )
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument(
        "--hidden-scale", type=int, default=None, help="divide widths and head counts by this (head_dim kept)"
    )
    p.add_argument("--tiny", action="store_true", help="a shrunk model and run for smoke tests (see above)")
    p.add_argument("--method", default=d.method, help="decomposer of the compressed side (default wsvd)")
    p.add_argument("--ratio", type=float, default=d.ratio, help="ρ1 of q/k/v (default 0.5)")
    p.add_argument(
        "--allocation", default=None, help="rank allocation (default: the method's first; wsvd: importance)"
    )
    p.add_argument("--finetune", action="store_true", help="wsvd's local fine-tuning on (off by default)")
    p.add_argument(
        "--quant",
        default=None,
        help="quantization scheme after the decomposition (e.g. w8a16-kv8: int8 "
        "weights computed from their integers, int8 latents)",
    )
    p.add_argument("--calib-samples", type=int, default=None, help=f"(default {d.calib_samples})")
    p.add_argument("--calib-tokens", type=int, default=None, help=f"(default {d.calib_tokens})")
    p.add_argument("--no-check", action="store_true", help="skip the latent-vs-rebuilt-K/V logit check")
    p.add_argument(
        "--no-graph", action="store_true", help="latent decode steps eager only (no CUDA graph replay)"
    )
    p.add_argument(
        "--no-static-baseline",
        action="store_true",
        help="skip the reference row of transformers' StaticCache replayed from a CUDA graph",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    a = p.parse_args(argv)
    values = dict(TINY_RUN) if a.tiny else {}
    for name in (
        "batch",
        "context",
        "steps",
        "warmup",
        "layers",
        "hidden_scale",
        "calib_samples",
        "calib_tokens",
    ):
        if getattr(a, name) is not None:
            values[name] = getattr(a, name)
    settings = E2ESettings(
        arch=a.arch,
        device=a.device,
        dtype=a.dtype,
        method=a.method,
        ratio=a.ratio,
        allocation=a.allocation,
        finetune=a.finetune,
        quant=a.quant,
        check=not a.no_check,
        graph=not a.no_graph,
        static_baseline=not a.no_static_baseline,
        seed=a.seed,
        **values,
    )
    return settings, a.output


def main(argv: list[str] | None = None) -> int:
    settings, output = parse(argv)
    try:
        res = run_e2e(settings, say=lambda line: print(line, file=sys.stderr, flush=True))
    except LowRankError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    res["command"] = " ".join(
        ["python", "benchmarks/decode_e2e.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(summary_line(res))
    return 0 if res["check"].get("ok", not settings.check) else 1


if __name__ == "__main__":
    sys.exit(main())
