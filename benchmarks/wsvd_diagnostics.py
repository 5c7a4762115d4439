"""Why wsvd ranks below svdllm on the testbed, and why its local fine-tuning does not help (issue 4).

Runs on the CPU, on the trained testbed (``lowrank testbed build`` first), in four parts:

1. ``errors``: per layer and for Q, K, V at each ρ1, the whitened (activation-weighted) truncation error
   ``‖(W − Ŵ) X‖ / ‖W X‖`` of ``svdllm`` (one whitened SVD of the whole matrix) and of ``wsvd`` without
   fine-tuning (whitened SVD per head; importance and uniform ranks), on the calibration tokens and on
   the test split's tokens, with the spectra behind them: the effective rank of the layer input, of the
   stacked whitened matrix ``W S`` and of each head's ``W_h S``, and the energy each method keeps.
2. ``control``: the same comparison on edited testbeds in which every head keeps its own whitened
   spectrum but reads either mutually orthogonal whitened input directions (``independent``) or the same
   ones (``shared``), plus the letter KL of each compressed model against its uncompressed edited model
   on the test split.
3. ``finetune``: per layer and target, before and after wsvd's local fine-tuning, the Fisher-weighted
   objective (on the Fisher the fine-tuning used and on a Fisher from held-out train samples), the full
   empirical-Fisher quadratic ``mean_n ⟨G_n, ΔW⟩²`` on held-out samples (the diagonal objective without
   its independence assumption), the whitened error, and the answer NLL when only that matrix is
   swapped from its no-FT to its FT factors; then the whole model's calibration NLL, test NLL, accuracy
   and KL for no-FT, FT with the default 64-sample Fisher and FT with a Fisher from more samples.
4. the accuracy of every variant on the test split (the grid's evaluation, one cell each).

    python benchmarks/wsvd_diagnostics.py --output benchmarks/results/wsvd_diagnostics/

Writes ``diagnostics.json`` to ``--output``. The numbers and what they show are in docs/methods.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ("q_proj", "k_proj", "v_proj")


# -- jobs and weights -------------------------------------------------------------------------------
def make_job(model, adapter, samples, ratio: float | None = None, allocation: str = "uniform"):
    from lowrank_kit.methods.base import DecomposeJob

    return DecomposeJob(
        model=model,
        adapter=adapter,
        info=adapter.info(model),
        targets=TARGETS,
        ratios=dict.fromkeys(TARGETS, ratio) if ratio is not None else {},
        allocation=allocation,
        calibration=samples,
    )


def dense(factors) -> torch.Tensor:
    """The weight a factor object stands for (m×n, fp64)."""
    from lowrank_kit.modules import DenseFactors

    if isinstance(factors, DenseFactors):
        return (factors.A.double() @ factors.B.double()).contiguous()
    return torch.cat([a.double() @ b.double() for a, b in zip(factors.A, factors.B)], dim=0)


def grams(model, adapter, samples) -> dict[int, torch.Tensor]:
    """Per layer, the mean Gram matrix of the input q/k/v share, over ``samples`` (fp64)."""
    from lowrank_kit.methods.stats import StageRecorder, collect_input_stats

    job = make_job(model, adapter, samples)
    stats = collect_input_stats(job, StageRecorder(job.reporter, "cpu"), abs_mean=False, samples=samples)
    return {layer: g.double() for layer, g in stats.gram.items()}


def fishers(model, adapter, samples) -> dict[tuple[int, str], torch.Tensor]:
    from lowrank_kit.methods.stats import StageRecorder, collect_gradient_stats

    job = make_job(model, adapter, samples)
    return collect_gradient_stats(job, StageRecorder(job.reporter, "cpu"), samples=samples).fisher


def sample_grads(model, adapter, samples) -> list[dict[tuple[int, str], torch.Tensor]]:
    """Per sample, the answer-loss gradient of every q/k/v weight (for the full empirical-Fisher form)."""
    from lowrank_kit.methods.stats import _grads_only_on, _sample_grads

    job = make_job(model, adapter, samples)
    keys = [(layer, t) for layer in job.layers for t in TARGETS]
    params = [job.projection(layer, t).weight for layer, t in keys]
    out = []
    with _grads_only_on(model, params):
        for sample in samples:
            _, grads, _ = _sample_grads(model, sample, params, 1.0)
            out.append({k: g.detach().double() for k, g in zip(keys, grads)})
    return out


# -- error measures ---------------------------------------------------------------------------------
def whitened_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """``‖(W − Ŵ) X‖_F / ‖W X‖_F`` with ``G = XᵀX / tokens`` (the token count cancels)."""
    D = W.double() - W_hat
    num = torch.einsum("ij,jk,ik->", D, G, D)
    den = torch.einsum("ij,jk,ik->", W.double(), G, W.double())
    return float((num / den).clamp_min(0).sqrt())


def fisher_objective(W: torch.Tensor, W_hat: torch.Tensor, F: torch.Tensor, heads: int) -> dict[str, float]:
    """wsvd's fine-tuning objective: per head ``Σ F ΔW² / Σ F W²``, its mean, and the matrix's total ratio."""
    D2 = (W.double() - W_hat) ** 2
    F = F.double()
    num = (F * D2).view(heads, -1).sum(1)
    den = (F * W.double() ** 2).view(heads, -1).sum(1)
    return {"mean_per_head": float((num / den).mean()), "total": float(num.sum() / den.sum())}


def empirical_fisher_form(W: torch.Tensor, W_hat: torch.Tensor, grads: list[torch.Tensor]) -> float:
    """``mean_n ⟨G_n, W − Ŵ⟩² / mean_n ⟨G_n, W⟩²``: the Fisher quadratic with its off-diagonal terms."""
    D = W.double() - W_hat
    num = torch.stack([(g * D).sum() ** 2 for g in grads]).mean()
    den = torch.stack([(g * W.double()).sum() ** 2 for g in grads]).mean()
    return float(num / den)


def effective_rank(values: torch.Tensor) -> float:
    """exp of the entropy of the normalised energies (Roy & Vetterli); ``values`` are energies (σ²)."""
    p = values.double().clamp_min(0)
    p = p / p.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def rank_for(energies: torch.Tensor, fraction: float) -> int:
    e = energies.double().sort(descending=True).values
    c = e.cumsum(0) / e.sum()
    return int((c < fraction).sum()) + 1


def whitened_svals(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.double() @ S)


def spectra(
    W: torch.Tensor, G: torch.Tensor, heads: int, dense_rank: int, head_ranks: list[int], uniform_rank: int
) -> dict:
    """Spectra that explain per-head versus whole-matrix truncation for one target of one layer."""
    from lowrank_kit.methods.linalg import whitening

    S = whitening(G).S
    d = W.shape[0] // heads
    stacked = whitened_svals(W, S) ** 2
    per_head = [whitened_svals(W[h * d : (h + 1) * d], S) ** 2 for h in range(heads)]
    total = float(stacked.sum())
    kept_dense = float(stacked[:dense_rank].sum()) / total
    kept_heads = sum(float(e[:r].sum()) for e, r in zip(per_head, head_ranks)) / total
    kept_uniform = sum(float(e[:uniform_rank].sum()) for e in per_head) / total
    return {
        "stacked_effective_rank": effective_rank(stacked),
        "stacked_rank_90": rank_for(stacked, 0.90),
        "stacked_rank_99": rank_for(stacked, 0.99),
        "head_effective_rank": [effective_rank(e) for e in per_head],
        "head_rank_90": [rank_for(e, 0.90) for e in per_head],
        "sum_head_effective_rank": sum(effective_rank(e) for e in per_head),
        "svdllm_rank": dense_rank,
        "wsvd_head_ranks": head_ranks,
        "wsvd_latent_total": sum(head_ranks),
        "energy_kept_svdllm": kept_dense,
        "wsvd_uniform_rank": uniform_rank,
        "energy_kept_wsvd_uniform": kept_uniform,
        # With the same ranks but the top components by σ; importance allocation keeps the top ones by
        # score instead, which may leave out a larger σ, so its measured error can only be larger.
        "energy_kept_wsvd_top_sigma": kept_heads,
        # For a truncated whitened SVD the squared error is exactly the energy left out: a check that
        # the measured errors and the spectra agree (factors un-whitened once, on the right side).
        "predicted_error_svdllm": max(0.0, 1 - kept_dense) ** 0.5,
        "predicted_error_wsvd_uniform": max(0.0, 1 - kept_uniform) ** 0.5,
        "lower_bound_error_wsvd": max(0.0, 1 - kept_heads) ** 0.5,
    }


# -- whole-model measures ---------------------------------------------------------------------------
def answer_nll(model, samples) -> float:
    from lowrank_kit.methods.stats import _forward, answer_loss

    total = 0.0
    with torch.no_grad():
        for sample in samples:
            moved, out = _forward(model, sample)
            total += float(answer_loss(out.logits, moved.labels))
    return total / len(samples)


def with_plan(model, adapter, plan):
    from lowrank_kit.surgery import apply_plan

    return apply_plan(copy.deepcopy(model), adapter, plan)


def with_weights(model, adapter, weights: dict[tuple[int, str], torch.Tensor]):
    """A copy of ``model`` whose listed q/k/v weights are replaced by dense ones (same shapes)."""
    out = copy.deepcopy(model)
    for (layer, target), W in weights.items():
        proj = adapter.get_projection(out, layer, target)
        with torch.no_grad():
            proj.weight.copy_(W.to(proj.weight.dtype))
    return out


def evaluate_model(model, loaded, items, reference=None) -> dict[str, Any]:
    from lowrank_kit.eval.engine import evaluate

    result = evaluate(model, loaded.processor, loaded.adapter, items, batch_size=16, reference=reference)
    return {"result": result, "accuracy": result.accuracy, "nll": result.nll, "kl": result.kl}


def summary(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "result"}


# -- the controlled edit ----------------------------------------------------------------------------
def edit_heads(model, adapter, samples, mode: str, seed: int = 0):
    """A copy of ``model`` whose q/k/v heads keep their whitened spectra but read chosen input directions.

    Layer by layer (the input Gram of layer l depends only on layers before l, so it is final when layer
    l is edited): each head's whitened weight ``W_h S = U_h Σ_h V_hᵀ`` becomes ``U_h Σ_h Q_hᵀ`` with
    ``Q_h`` orthonormal columns of a seeded random orthogonal matrix: a different block per head
    (``independent``: the heads' whitened row spaces are mutually orthogonal) or the same block for every
    head (``shared``). Each head's output covariance ``W_h G W_hᵀ = U_h Σ_h² U_hᵀ`` is unchanged.
    """
    from lowrank_kit.methods.linalg import whitening

    if mode not in ("independent", "shared"):
        raise ValueError(f"unknown edit mode {mode!r}; choose independent or shared")
    out = copy.deepcopy(model)
    info = adapter.info(out)
    d, n = info.head_dim, info.hidden_size
    gen = torch.Generator().manual_seed(seed)
    for layer in range(info.num_layers):
        G = grams(out, adapter, samples)[layer]
        transform = whitening(G)
        S, S_inv = transform.S, transform.S_inv
        for target in TARGETS:
            heads = info.heads_of(target)
            if mode == "independent" and heads * d > n:
                raise ValueError(f"{heads} heads × {d} do not fit {n} orthogonal input directions")
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            proj = adapter.get_projection(out, layer, target)
            W = proj.weight.detach().double().view(heads, d, n)
            new = []
            for h in range(heads):
                U, s, _ = torch.linalg.svd(W[h] @ S, full_matrices=False)
                block = Q[:, (h if mode == "independent" else 0) * d :][:, :d]
                new.append((U * s) @ block.T @ S_inv)
            with torch.no_grad():
                proj.weight.copy_(torch.cat(new).to(proj.weight.dtype))
    return out


def compare_on(model, adapter, samples, ratio: float) -> dict[str, Any]:
    """svdllm against wsvd without fine-tuning (importance and uniform ranks) on one model at one ρ1."""
    from lowrank_kit.methods.svdllm import SVDLLMConfig, SVDLLMDecomposer
    from lowrank_kit.methods.wsvd import WSVDConfig, WSVDDecomposer

    plans = {
        "svdllm": SVDLLMDecomposer(SVDLLMConfig()).decompose(make_job(model, adapter, samples, ratio)),
        "wsvd_noft": WSVDDecomposer(WSVDConfig(finetune=False)).decompose(
            make_job(model, adapter, samples, ratio, "importance")
        ),
        "wsvd_noft_uniform": WSVDDecomposer(WSVDConfig(finetune=False)).decompose(
            make_job(model, adapter, samples, ratio, "uniform")
        ),
    }
    return plans


# -- parts ------------------------------------------------------------------------------------------
def part_errors(loaded, calib, test_samples, ratios, G_cal, G_test) -> dict[str, Any]:
    model, adapter = loaded.model, loaded.adapter
    info = adapter.info(model)
    out: dict[str, Any] = {
        "input_effective_rank": {
            str(layer): {
                "calibration": effective_rank(torch.linalg.eigvalsh(G)),
                "rank_99_calibration": rank_for(torch.linalg.eigvalsh(G), 0.99),
            }
            for layer, G in G_cal.items()
        },
        "ratios": {},
    }
    for ratio in ratios:
        plans = compare_on(model, adapter, calib, ratio)
        rows = []
        for layer in range(info.num_layers):
            for target in TARGETS:
                W = adapter.get_projection(model, layer, target).weight.detach().double()
                row: dict[str, Any] = {"layer": layer, "target": target}
                for name, plan in plans.items():
                    W_hat = dense(plan.layers[layer].factors[target])
                    row[f"{name}_calib"] = whitened_error(W, W_hat, G_cal[layer])
                    row[f"{name}_test"] = whitened_error(W, W_hat, G_test[layer])
                heads = info.heads_of(target)
                row["spectra"] = spectra(
                    W,
                    G_cal[layer],
                    heads,
                    plans["svdllm"].layers[layer].factors[target].rank,
                    plans["wsvd_noft"].layers[layer].factors[target].ranks,
                    plans["wsvd_noft_uniform"].layers[layer].factors[target].ranks[0],
                )
                rows.append(row)
        out["ratios"][str(ratio)] = {
            "rows": rows,
            "mean": {
                k: sum(r[k] for r in rows) / len(rows)
                for k in rows[0]
                if k not in ("layer", "target", "spectra")
            },
        }
    return out


def part_control(loaded, calib, test_items, ratio: float, seed: int) -> dict[str, Any]:
    model, adapter = loaded.model, loaded.adapter
    info = adapter.info(model)
    out: dict[str, Any] = {"ratio": ratio}
    for mode in ("independent", "shared"):
        t0 = time.perf_counter()
        edited = edit_heads(model, adapter, calib, mode, seed)
        G = grams(edited, adapter, calib)
        plans = compare_on(edited, adapter, calib, ratio)
        errors = {name: [] for name in plans}
        for layer in range(info.num_layers):
            for target in TARGETS:
                W = adapter.get_projection(edited, layer, target).weight.detach().double()
                for name, plan in plans.items():
                    errors[name].append(
                        whitened_error(W, dense(plan.layers[layer].factors[target]), G[layer])
                    )
        reference = evaluate_model(edited, loaded, test_items)
        entry: dict[str, Any] = {"uncompressed": summary(reference)}
        for name, plan in plans.items():
            ev = evaluate_model(with_plan(edited, adapter, plan), loaded, test_items, reference["result"])
            entry[name] = {
                "whitened_error_mean": sum(errors[name]) / len(errors[name]),
                "whitened_error_per_matrix": errors[name],
                **summary(ev),
            }
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        out[mode] = entry
    return out


def part_finetune(loaded, calib, test_samples, heldout, ratio, fisher_samples) -> dict[str, Any]:
    from lowrank_kit.methods.stats import StageRecorder
    from lowrank_kit.methods.wsvd import WSVDConfig, WSVDDecomposer

    model, adapter = loaded.model, loaded.adapter
    info = adapter.info(model)
    job = make_job(model, adapter, calib, ratio, "importance")
    no_ft = WSVDDecomposer(WSVDConfig(finetune=False)).decompose(job)
    ft = WSVDDecomposer(WSVDConfig()).decompose(make_job(model, adapter, calib, ratio, "importance"))

    # The same no-FT factors tuned on a Fisher from more samples: only the Fisher changes.
    big = WSVDDecomposer(WSVDConfig())
    factors = {(lp.layer, t): copy.deepcopy(f) for lp in no_ft.layers for t, f in lp.factors.items()}
    big_fisher = fishers(model, adapter, fisher_samples)
    big_report = big._finetune(job, factors, dict(big_fisher), StageRecorder(job.reporter, "cpu"))

    F_cal = fishers(model, adapter, calib)
    F_held = fishers(model, adapter, heldout)
    g_held = sample_grads(model, adapter, heldout)
    G_cal = grams(model, adapter, calib)
    G_test = grams(model, adapter, test_samples)

    weights = {
        "noft": {(lp.layer, t): dense(f) for lp in no_ft.layers for t, f in lp.factors.items()},
        "ft": {(lp.layer, t): dense(f) for lp in ft.layers for t, f in lp.factors.items()},
        "ft_big_fisher": {k: dense(f) for k, f in factors.items()},
    }
    base_cal = answer_nll(with_weights(model, adapter, weights["noft"]), calib)
    base_test = answer_nll(with_weights(model, adapter, weights["noft"]), test_samples)
    rows = []
    for layer in range(info.num_layers):
        for target in TARGETS:
            key = (layer, target)
            W = adapter.get_projection(model, layer, target).weight.detach().double()
            heads = info.heads_of(target)
            row: dict[str, Any] = {"layer": layer, "target": target}
            for name, ws in weights.items():
                W_hat = ws[key]
                row[name] = {
                    "fisher_objective_calib": fisher_objective(W, W_hat, F_cal[key], heads),
                    "fisher_objective_heldout": fisher_objective(W, W_hat, F_held[key], heads),
                    "empirical_fisher_form_heldout": empirical_fisher_form(
                        W, W_hat, [g[key] for g in g_held]
                    ),
                    "whitened_error_calib": whitened_error(W, W_hat, G_cal[layer]),
                    "whitened_error_test": whitened_error(W, W_hat, G_test[layer]),
                    "weight_error": float((W - W_hat).norm() / W.norm()),
                }
            # Swap only this matrix from its no-FT to its FT factors, everything else no-FT.
            swapped = dict(weights["noft"])
            swapped[key] = weights["ft"][key]
            m = with_weights(model, adapter, swapped)
            row["swap_in_ft_delta_nll_calib"] = answer_nll(m, calib) - base_cal
            row["swap_in_ft_delta_nll_test"] = answer_nll(m, test_samples) - base_test
            rows.append(row)
    models: dict[str, Any] = {}
    for name, ws in weights.items():
        m = with_weights(model, adapter, ws)
        models[name] = {"nll_calib": answer_nll(m, calib), "nll_test_answers": answer_nll(m, test_samples)}
    models["uncompressed"] = {
        "nll_calib": answer_nll(model, calib),
        "nll_test_answers": answer_nll(model, test_samples),
    }
    # Fisher noise: how alike the 64-sample Fisher and an independent Fisher of the held-out samples are.
    agreement = {}
    for key in F_cal:
        a, b = F_cal[key].double().flatten(), F_held[key].double().flatten()
        agreement[f"{key[0]}.{key[1]}"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {
        "ratio": ratio,
        "report_ft": ft.report["finetune"],
        "report_ft_big_fisher": big_report,
        "fisher_samples_big": len(fisher_samples),
        "heldout_samples": len(heldout),
        "fisher_correlation_calib_vs_heldout": agreement,
        "rows": rows,
        "models": models,
        "weights": weights,  # dropped before writing; the evaluation part reuses them
        "plans": {"noft": no_ft, "ft": ft},
    }


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="testbed", help="model spec (default: the built testbed)")
    p.add_argument("--ratios", default="0.9,0.7,0.5", help="ρ1 values of the error part (comma-separated)")
    p.add_argument("--ratio", type=float, default=0.5, help="ρ1 of the control and fine-tuning parts")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples (the grid's 64)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (the grid's 0)")
    p.add_argument("--heldout-samples", type=int, default=128, help="train samples of another seed")
    p.add_argument("--fisher-samples", type=int, default=512, help="samples of the larger Fisher")
    p.add_argument("--limit", type=int, default=None, help="test items (default: all 480)")
    p.add_argument("--parts", default="errors,control,finetune", help="which parts to run")
    p.add_argument("--output", default="benchmarks/results/wsvd_diagnostics", help="output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from lowrank_kit.data.sources import build_calibration
    from lowrank_kit.eval.datasets import load_eval_data
    from lowrank_kit.loading import load_model
    from lowrank_kit.recipe import CalibrationSpec

    torch.manual_seed(0)
    t_start = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    ratios = [float(r) for r in args.ratios.split(",")]
    loaded = load_model(args.model, device="cpu")
    model, adapter = loaded.model, loaded.adapter

    def samples(split: str, n: int, seed: int):
        spec = CalibrationSpec(split=split, num_samples=n, seed=seed)
        return build_calibration(spec, loaded.processor, adapter)

    calib = samples("train", args.calib_samples, args.seed)
    test_samples = samples("test", 480, 0)
    data = load_eval_data("testbed", limit=args.limit)
    results: dict[str, Any] = {
        "command": "python benchmarks/wsvd_diagnostics.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": vars(args),
        "test_items": len(data.items),
    }
    fp = evaluate_model(model, loaded, data.items)
    results["uncompressed"] = summary(fp)
    G_cal = grams(model, adapter, calib)
    G_test = grams(model, adapter, test_samples)
    if "errors" in parts:
        t0 = time.perf_counter()
        results["errors"] = part_errors(loaded, calib, test_samples, ratios, G_cal, G_test)
        results["errors"]["seconds"] = round(time.perf_counter() - t0, 1)
    if "control" in parts:
        t0 = time.perf_counter()
        results["control"] = part_control(loaded, calib, data.items, args.ratio, args.seed)
        results["control"]["seconds"] = round(time.perf_counter() - t0, 1)
    if "finetune" in parts:
        t0 = time.perf_counter()
        heldout = samples("train", args.heldout_samples, args.seed + 1)
        big = samples("train", args.fisher_samples, args.seed + 2)
        ft = part_finetune(loaded, calib, test_samples, heldout, args.ratio, big)
        weights, plans = ft.pop("weights"), ft.pop("plans")
        evals = {}
        for name, ws in weights.items():
            evals[name] = summary(
                evaluate_model(with_weights(model, adapter, ws), loaded, data.items, fp["result"])
            )
        for name, plan in compare_on(model, adapter, calib, args.ratio).items():
            if name != "wsvd_noft":  # the same factors as weights["noft"], evaluated above
                evals[name] = summary(
                    evaluate_model(with_plan(model, adapter, plan), loaded, data.items, fp["result"])
                )
        ft["evaluation"] = evals
        ft["ranks_noft_equal_ft"] = all(
            plans["noft"].layers[i].factors[t].ranks == plans["ft"].layers[i].factors[t].ranks
            for i in range(len(plans["noft"].layers))
            for t in TARGETS
        )
        ft["seconds"] = round(time.perf_counter() - t0, 1)
        results["finetune"] = ft
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "diagnostics.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {path} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
