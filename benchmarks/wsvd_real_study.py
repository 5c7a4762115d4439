"""Why wsvd leads at high ρ1 and falls behind svdllm at low ρ1 on a real model, and which settings help
(issue 21, item 6). Runs on the CPU on SmolLM2-135M-Instruct (``smollm2-135m``, the packaged real model).

Every setting is judged on **held-out development text**, never on the evaluation part the accuracy grid
reports: the calibration part of ``text:pydoc`` is cut by position, the first 85% is the calibration pool
(256-token windows in a seeded order; a run with N samples takes the first N), the last 15% is the
development set (the first ``--dev-windows`` windows of 512 tokens). The evaluation part is not read.

Parts (``--parts``, comma-separated):

- ``subspace``: per layer and q/k/v at each ρ1, the whitened truncation error ``‖(W − Ŵ) S‖ / ‖W S‖``
  (``S Sᵀ`` the Gram of the layer input) of one SVD of the whole matrix (svdllm's layout) and of one SVD
  per head at the same parameter count (wsvd's layout with uniform ranks), the effective rank of the
  whole whitened matrix and of each head, and how much the heads' leading input subspaces overlap
  (mean ``‖V_iᵀ V_j‖²_F / r`` over head pairs: 1 when the heads read the same directions, ``r/n`` for
  random ones). No gradients; one Gram pass.
- ``fisher``: wsvd (importance ranks) at ρ1 0.5 with 64 / 256 / 512 calibration samples, without
  fine-tuning at 64 and 256, and at ρ1 0.3 with 64 (with and without fine-tuning): the Fisher and the importance
  scores are means over the samples, so the sample count is what this varies. The pydoc pool holds 289
  windows of 256 tokens, so the 512-sample cell stops with that message (it needs a larger corpus).
- ``finetune``: wsvd at ρ1 0.5, 64 samples, 100 fine-tuning steps at learning rates 1e-3 and 1e-2, and
  25 and 300 steps at 1e-4 (the defaults are 100 steps at 1e-4).
- ``allocation``: wsvd with uniform ranks against importance ranks, and svdllm, at ρ1 0.5 and 0.3.

    python benchmarks/wsvd_real_study.py --output benchmarks/results/wsvd_real_study/

Writes ``study.json`` to ``--output`` after every cell (a rerun skips finished cells). The numbers and
what they show are in docs/methods.md ("Accuracy on real weights").
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

MODEL = "smollm2-135m"
CORPUS = "text:pydoc"
POOL_FRACTION = 0.85
TARGETS = ("q_proj", "k_proj", "v_proj")


def split_calibration_text(text: str) -> tuple[str, str]:
    """The calibration part cut by position (at a line end): the calibration pool, the development text."""
    cut = int(len(text) * POOL_FRACTION)
    line_end = text.find("\n", cut)
    cut = line_end + 1 if line_end >= 0 else cut
    return text[:cut], text[cut:]


def pool_samples(tokenizer, pool: str, n: int, length: int, seed: int) -> list:
    from lowrank_kit.data.calibration import CalibrationSample
    from lowrank_kit.data.text import token_windows

    windows = token_windows(tokenizer, pool, length)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    if n > len(order):
        raise SystemExit(f"the calibration pool has {len(order)} windows of {length} tokens, fewer than {n}")
    out = []
    for i in order[:n]:
        ids = windows[i : i + 1].clone()
        out.append(
            CalibrationSample(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=ids)
        )
    return out


# -- part 1: subspaces ------------------------------------------------------------------------------
def whitening_root(G: torch.Tensor) -> torch.Tensor:
    """``S`` with ``S Sᵀ = G`` (eigen route, tiny eigenvalues floored), fp64."""
    evals, evecs = torch.linalg.eigh(G.double())
    evals = evals.clamp_min(evals.max() * 1e-10)
    return evecs * evals.sqrt()


def effective_rank(energies: torch.Tensor) -> float:
    p = energies.double().clamp_min(0)
    p = p / p.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_entry(W: torch.Tensor, S: torch.Tensor, heads: int, ratio: float) -> dict[str, Any]:
    m, n = W.shape
    d = m // heads
    WS = W.double() @ S
    s_all = torch.linalg.svdvals(WS)
    total = float((s_all**2).sum())
    r_head = max(1, int(ratio * d * n / (d + n)))
    params = heads * r_head * (d + n)
    r_shared = min(min(m, n), params // (m + n))
    shared_err = float((s_all[r_shared:] ** 2).sum() / total) ** 0.5
    head_tail, head_eff, bases = 0.0, [], []
    for h in range(heads):
        _, s, Vh = torch.linalg.svd(WS[h * d : (h + 1) * d], full_matrices=False)
        head_tail += float((s[r_head:] ** 2).sum())
        head_eff.append(effective_rank(s**2))
        bases.append(Vh[:r_head])
    overlaps = [
        float((bases[i] @ bases[j].T).pow(2).sum()) / r_head
        for i, j in itertools.combinations(range(heads), 2)
    ]
    return {
        "rank_per_head": r_head,
        "rank_shared": r_shared,
        "params": params,
        "error_shared": shared_err,
        "error_per_head": (head_tail / total) ** 0.5,
        "effective_rank_whole": effective_rank(s_all**2),
        "effective_rank_head_mean": sum(head_eff) / heads,
        "head_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
        "head_overlap_random": r_head / n,
    }


def part_subspace(loaded, samples, ratios: list[float]) -> dict[str, Any]:
    from lowrank_kit.methods.base import DecomposeJob
    from lowrank_kit.methods.stats import StageRecorder, collect_input_stats

    model, adapter = loaded.model, loaded.adapter
    info = adapter.info(model)
    job = DecomposeJob(
        model=model, adapter=adapter, info=info, targets=TARGETS, ratios={}, calibration=samples
    )
    stats = collect_input_stats(
        job, StageRecorder(job.reporter, "cpu"), abs_mean=False, gram=True, samples=samples
    )
    layers: dict[str, Any] = {}
    for layer in job.layers:
        S = whitening_root(stats.gram[layer])
        layers[str(layer)] = {
            target: {
                str(ratio): subspace_entry(
                    job.projection(layer, target).weight.detach(), S, info.heads_of(target), ratio
                )
                for ratio in ratios
            }
            for target in TARGETS
        }
    means: dict[str, Any] = {}
    for target in TARGETS:
        for ratio in ratios:
            rows = [layers[str(layer)][target][str(ratio)] for layer in job.layers]
            means[f"{target}@{ratio}"] = {
                k: sum(r[k] for r in rows) / len(rows)
                for k in (
                    "error_shared",
                    "error_per_head",
                    "effective_rank_whole",
                    "effective_rank_head_mean",
                    "head_overlap",
                    "head_overlap_random",
                )
                if rows[0][k] is not None
            } | {
                "layers_where_per_head_wins": sum(r["error_per_head"] < r["error_shared"] for r in rows),
                "rank_per_head": rows[0]["rank_per_head"],
                "rank_shared": rows[0]["rank_shared"],
            }
    return {
        "calibration_samples": len(samples),
        "tokens": stats.tokens,
        "mean_over_layers": means,
        "layers": layers,
    }


# -- parts 2-4: compress and score on the development text --------------------------------------------
# (key, method, ρ1, samples, params), in the order they run: the most telling first, since a 2-core CPU
# gets through about eight of them an hour.
# The cells named plain "wsvd" fine-tune, as wsvd did by default when they were measured.
FT = {"finetune": True}
CELLS: dict[str, list[tuple[str, str, float, int, dict[str, Any]]]] = {
    "fisher": [
        ("wsvd@0.5/n=64", "wsvd", 0.5, 64, FT),
        ("wsvd-noft@0.5/n=64", "wsvd", 0.5, 64, {"finetune": False}),
        ("wsvd@0.5/n=256", "wsvd", 0.5, 256, FT),
        ("wsvd-noft@0.5/n=256", "wsvd", 0.5, 256, {"finetune": False}),
        ("wsvd@0.3/n=64", "wsvd", 0.3, 64, FT),
        ("wsvd-noft@0.3/n=64", "wsvd", 0.3, 64, {"finetune": False}),
        ("wsvd@0.5/n=512", "wsvd", 0.5, 512, FT),
    ],
    "allocation": [
        ("svdllm@0.5/n=64", "svdllm", 0.5, 64, {}),
        ("wsvd-uniform@0.5/n=64", "wsvd-uniform", 0.5, 64, FT),
        ("svdllm@0.3/n=64", "svdllm", 0.3, 64, {}),
    ],
    "finetune": [
        (f"wsvd@0.5/n=64/steps={s}/lr={lr:g}", "wsvd", 0.5, 64, {**FT, "ft_steps": s, "ft_lr": lr})
        for s, lr in ((100, 1e-3), (100, 1e-2), (25, 1e-4), (300, 1e-4))
    ],
}
ORDER = [
    "wsvd@0.5/n=64",
    "wsvd-noft@0.5/n=64",
    "svdllm@0.5/n=64",
    "wsvd-uniform@0.5/n=64",
    "wsvd@0.5/n=64/steps=100/lr=0.001",
    "wsvd@0.5/n=256",
    "wsvd-noft@0.5/n=256",
    "wsvd@0.5/n=64/steps=100/lr=0.01",
    "wsvd@0.5/n=64/steps=25/lr=0.0001",
    "wsvd@0.5/n=64/steps=300/lr=0.0001",
    "wsvd@0.3/n=64",
    "svdllm@0.3/n=64",
    "wsvd-noft@0.3/n=64",
    "wsvd@0.5/n=512",
]


def run_cell(loaded, method: str, ratio: float, samples, params: dict[str, Any], dev) -> dict[str, Any]:
    from lowrank_kit.eval.perplexity import perplexity
    from lowrank_kit.pipeline import compress
    from lowrank_kit.recipe import DecomposeStep, Recipe

    allocation = None
    if method == "wsvd-uniform":
        method, allocation = "wsvd", "uniform"
    recipe = Recipe(
        model=MODEL,
        steps=[DecomposeStep(method=method, ratio=ratio, params=params, rank_allocation=allocation)],
    )
    model = copy.deepcopy(loaded.model)
    t0 = time.perf_counter()
    result = compress(model, recipe, adapter=loaded.adapter, processor=loaded.processor, calibration=samples)
    seconds = time.perf_counter() - t0
    score = perplexity(model.eval(), dev, batch_size=4)
    dec = result.report["decompose"]
    return {
        "method": method,
        "rank_allocation": dec.get("rank_allocation"),
        "params": params,
        "requested_rho1": ratio,
        "rho1": result.report["rho1"],
        "rho2": result.report["rho2"],
        "samples": len(samples),
        "calibration_loss": dec.get("calibration_loss"),
        "finetune": dec.get("finetune"),
        "dev_perplexity": score["perplexity"],
        "dev_nll": score["nll"],
        "compress_seconds": round(seconds, 1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="subspace,fisher,finetune,allocation")
    p.add_argument("--ratios", default="0.9,0.7,0.5,0.3", help="ρ1 values of the subspace part")
    p.add_argument("--subspace-samples", type=int, default=64)
    p.add_argument("--sample-length", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--dev-windows", type=int, default=16)
    p.add_argument("--dev-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmarks/results/wsvd_real_study")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from lowrank_kit.data.text import corpus_text, token_windows
    from lowrank_kit.eval.perplexity import perplexity
    from lowrank_kit.loading import load_model

    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"subspace", *CELLS}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; valid: subspace, {', '.join(CELLS)}")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "study.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)

    loaded = load_model(MODEL, dtype=torch.float32)
    loaded.model.eval()
    pool, dev_text = split_calibration_text(corpus_text(CORPUS, "calibration"))
    dev = token_windows(loaded.processor, dev_text, args.dev_length, max_windows=args.dev_windows)
    results["setup"] = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": MODEL,
        "corpus": CORPUS,
        "pool": f"first {POOL_FRACTION:.0%} of the calibration part, {args.sample_length}-token windows, seed {args.seed}",
        "dev": f"last {1 - POOL_FRACTION:.0%} of the calibration part: {dev.shape[0]} windows of {dev.shape[1]} tokens",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    if "uncompressed" not in results:
        results["uncompressed"] = {
            "dev_perplexity": perplexity(loaded.model, dev, batch_size=4)["perplexity"]
        }
        save()
    print(f"uncompressed dev perplexity {results['uncompressed']['dev_perplexity']:.3f}", flush=True)

    cache: dict[int, list] = {}

    def samples(n: int) -> list:
        if n not in cache:
            cache[n] = pool_samples(loaded.processor, pool, n, args.sample_length, args.seed)
        return cache[n]

    if "subspace" in parts and "subspace" not in results:
        t0 = time.perf_counter()
        ratios = [float(r) for r in args.ratios.split(",")]
        results["subspace"] = part_subspace(loaded, samples(args.subspace_samples), ratios)
        results["subspace"]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
        for key, row in results["subspace"]["mean_over_layers"].items():
            print(
                f"subspace {key}: shared {row['error_shared']:.4f} per-head {row['error_per_head']:.4f} "
                f"overlap {row['head_overlap']:.3f} (random {row['head_overlap_random']:.3f})",
                flush=True,
            )

    cells = results.setdefault("cells", {})
    chosen = {c[0]: (part, c) for part in parts for c in CELLS.get(part, [])}
    for key in [k for k in ORDER if k in chosen]:
        part, (_, method, ratio, n, params) = chosen[key]
        if key not in cells:
            cells[key] = {"part": part, **run_cell(loaded, method, ratio, samples(n), params, dev)}
            save()
            print(
                f"{key}: dev perplexity {cells[key]['dev_perplexity']:.3f} "
                f"({cells[key]['compress_seconds']:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
