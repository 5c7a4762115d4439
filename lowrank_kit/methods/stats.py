"""The calibration-statistics engine shared by the decomposers (METHODS.md §1).

Two passes over the calibration samples, each reading only what the methods ask for:

- :func:`collect_input_stats` (forward only): per decoder layer, the per-channel mean absolute value
  of the input that q/k/v share (ASVD's ``s``) and its Gram matrix ``G = mean_tokens xᵀx`` (SVD-LLM's
  whitening). Forward hooks fold each sample's activations into the running sums at once, so no
  activation outlives the layer that produced it. The Gram matrix is averaged rather than summed: the
  same whitening up to one scalar, but factors whose size does not depend on how many tokens were seen.
- :func:`collect_gradient_stats` (one backward pass per sample, gradients only on the targeted
  projections): the element-wise Fisher ``F = mean_n g_n ⊙ g_n`` (fp32 accumulation) and, for every
  spectrum it is given, the per-singular-value importance ``I_i = σ_i · sqrt(mean_n (u_iᵀ G_n S^{-ᵀ} v_i)²)``.
  Each sample's gradient is folded into both and then dropped.

The loss is the teacher-forced cross-entropy on the answer tokens (:func:`answer_loss`): position
``t-1`` predicts ``labels[t]``. Results are plain tensors in dicts keyed by layer and target, so that an
on-disk cache can store them with safetensors (:meth:`InputStats.state_dict`).

:class:`StageRecorder` times each stage and records its peak memory, for ``Plan.report`` and for the
pipeline's report (:func:`lowrank_kit.pipeline.compress` times its steps with it).
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kit.calib_cache import samples_digest
from lowrank_kit.errors import CalibrationError
from lowrank_kit.methods.base import DecomposeJob
from lowrank_kit.methods.linalg import Spectrum
from lowrank_kit.progress import Reporter, Stage

# fp16 gradients of a 7B model are mostly below fp16's normal range (~6e-5): the loss is scaled up
# before the backward pass and the gradients scaled back in fp32, as mixed-precision training does.
FP16_LOSS_SCALE = 2.0**12


# -- stage timing -----------------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (the OS reports kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StageRecorder:
    """Progress bars from ``reporter`` plus wall time and peak memory per stage.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` since the stage began (the counter is reset
    at each stage start); on the CPU it is the process's peak resident memory so far, which the OS
    cannot reset, so it only grows from stage to stage.
    """

    def __init__(self, reporter: Reporter, device: torch.device) -> None:
        self.reporter = reporter
        self.device = torch.device(device)
        self.stages: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        with self.reporter.stage(name, total) as st:
            yield st
        if cuda:
            torch.cuda.synchronize(self.device)
        entry: dict[str, Any] = {"stage": name, "seconds": round(time.perf_counter() - t0, 4)}
        if cuda:
            entry["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        entry["peak_rss_bytes"] = _peak_rss_bytes()
        self.stages.append(entry)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": list(self.stages)}
        gpu = [s["peak_gpu_memory_bytes"] for s in self.stages if "peak_gpu_memory_bytes" in s]
        if gpu:
            out["peak_gpu_memory_bytes"] = max(gpu)
        return out


# -- inputs and the loss ----------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def require_calibration(job: DecomposeJob, method: str) -> list:
    if not job.calibration:
        raise CalibrationError(
            f"method {method!r} needs calibration samples, got none; give the recipe a calibration section "
            "or pass `calibration=` to compress()"
        )
    return list(job.calibration)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy (at least fp32, mean over answer tokens): ``logits[:, t-1]`` predicts ``labels[:, t]``."""
    targets = labels[:, 1:].to(logits.device)
    keep = targets != -100
    if not bool(keep.any()):
        raise CalibrationError(
            "a calibration sample has no answer tokens (every label is -100 after the shift); the gradient "
            "statistics need at least one"
        )
    picked = logits[:, :-1][keep]
    return F.cross_entropy(picked.to(torch.promote_types(picked.dtype, torch.float32)), targets[keep])


def _forward(model: nn.Module, sample: Any) -> Any:
    moved = sample.to(model_device(model), dtype=model_dtype(model))
    return moved, model(**moved.inputs, use_cache=False)


def stream_forward(
    runner: Any,
    captured: list,
    before: Any = None,
    stage: Stage | None = None,
    keep_inputs: bool = False,
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Every captured sample through every decoder layer, one layer on the device at a time.

    ``before(sample_index)`` runs before each sample enters a layer (the statistics hooks read which
    sample it is). Returns the last layer's outputs and, with ``keep_inputs``, each layer's inputs in host
    memory (for the backward pass of :func:`_stream_gradients`)."""
    hidden = [c.hidden for c in captured]
    inputs: list[list[torch.Tensor]] = []
    for index in range(runner.num_layers):
        if keep_inputs:
            inputs.append([h.to(runner.host) for h in hidden])
        with runner.onload(index) as layer:
            for s, sample in enumerate(captured):
                if before is not None:
                    before(s)
                hidden[s] = runner.run(layer, index, hidden[s], sample)
        if stage is not None:
            stage.advance()
    return hidden, inputs


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The token activations of a hooked input (batch, seq, n) as rows, padding positions dropped."""
    if mask is not None and not bool(mask.all()):
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise CalibrationError(
                f"a padded calibration sample has attention_mask of shape {tuple(mask.shape)} but the "
                f"language model saw {tuple(x.shape[:-1])} positions; give unpadded samples (batch 1)"
            )
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


# -- forward statistics -----------------------------------------------------------------------------
@dataclass
class InputStats:
    """Per decoder layer, statistics of the input that the layer's q/k/v projections share."""

    abs_mean: dict[int, torch.Tensor] = field(default_factory=dict)  # (n,) fp32
    gram: dict[int, torch.Tensor] = field(default_factory=dict)  # (n, n) fp32, mean over tokens
    tokens: int = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"tokens": torch.tensor(self.tokens)}
        out.update({f"layer.{i}.abs_mean": t for i, t in self.abs_mean.items()})
        out.update({f"layer.{i}.gram": t for i, t in self.gram.items()})
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> InputStats:
        stats = cls(tokens=int(state["tokens"]))
        for key, value in state.items():
            if key.startswith("layer."):
                _, layer, name = key.split(".")
                getattr(stats, name)[int(layer)] = value
        return stats


def collect_input_stats(
    job: DecomposeJob,
    recorder: StageRecorder,
    *,
    abs_mean: bool = True,
    gram: bool = True,
    samples: Sequence[Any] | None = None,
) -> InputStats:
    """Forward passes over the calibration samples with hooks on each layer's shared q/k/v input."""
    samples = list(samples if samples is not None else job.calibration or [])
    if not samples:
        raise CalibrationError("no calibration samples to collect activation statistics from")
    if job.cache is not None:
        parts = ("input_stats", f"abs_mean={abs_mean}", f"gram={gram}", f"targets={job.targets}")
        state = _through_cache(
            job,
            recorder,
            "calibration: activations",
            parts,
            samples,
            lambda: _input_stats(job, recorder, abs_mean, gram, samples).state_dict(),
        )
        return InputStats.from_state_dict(state)
    return _input_stats(job, recorder, abs_mean, gram, samples)


def _through_cache(job: DecomposeJob, recorder: StageRecorder, stage: str, parts, samples, compute):
    """Statistics from ``job.cache`` (on ``job.device``), or computed by ``compute`` and stored there."""

    parts = (*parts, f"samples={samples_digest(samples)[:16]}")
    if job.cache.has(parts):
        with recorder.stage(f"{stage} (reused from cache)", total=1) as st:
            state = job.cache.get_or_compute(parts, compute)
            st.advance()
    else:
        state = job.cache.get_or_compute(parts, compute)
    return {k: v.to(job.device) for k, v in state.items()}


def _input_stats(
    job: DecomposeJob, recorder: StageRecorder, abs_mean: bool, gram: bool, samples: list
) -> InputStats:
    stats = InputStats()
    sums: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    # q, k and v read the same normed hidden states, so one hook per layer (on the first target) suffices.
    probe = job.targets[0]
    first = job.layers[0]

    def hook_for(layer: int):
        def hook(_module: nn.Module, args: tuple, _kwargs: dict | None = None) -> None:
            rows = _token_rows(args[0].detach(), current["mask"]).to(job.device, torch.float32)
            if abs_mean:
                acc = sums.get(layer)
                sums[layer] = rows.abs().sum(0) if acc is None else acc.add_(rows.abs().sum(0))
            if gram:
                acc = stats.gram.get(layer)
                stats.gram[layer] = rows.T @ rows if acc is None else acc.addmm_(rows.T, rows)
            if layer == first:
                stats.tokens += rows.shape[0]

        return hook

    handles = [
        job.projection(layer, probe).register_forward_pre_hook(hook_for(layer)) for layer in job.layers
    ]
    try:
        if job.runner is not None:
            with torch.no_grad(), recorder.stage("calibration: activations", total=len(job.layers)) as st:

                def before(index: int) -> None:
                    current["mask"] = samples[index].inputs.get("attention_mask")

                stream_forward(job.runner, job.runner.capture(samples, model_dtype(job.model)), before, st)
        else:
            with torch.no_grad(), recorder.stage("calibration: activations", total=len(samples)) as st:
                for sample in samples:
                    mask = sample.inputs.get("attention_mask")
                    current["mask"] = mask
                    _forward(job.model, sample)
                    st.advance()
    finally:
        for h in handles:
            h.remove()
    if stats.tokens == 0:
        raise CalibrationError("the calibration samples produced no tokens at the language model's layers")
    for layer in job.layers:
        if abs_mean:
            stats.abs_mean[layer] = sums[layer] / stats.tokens
        if gram:
            stats.gram[layer] = stats.gram[layer].div_(stats.tokens)
    return stats


# -- gradient statistics ----------------------------------------------------------------------------
@dataclass
class ImportanceBasis:
    """A spectrum whose singular values get importance scores, and the targets whose gradient rows it spans.

    The gradients of ``targets`` are stacked along rows (in that order) and split into
    ``spectrum.groups`` equal row blocks: heads for a per-head spectrum, one block for a whole matrix or
    QSVD's stacked Q/K/V.
    """

    spectrum: Spectrum
    targets: tuple[str, ...]


@dataclass
class GradientStats:
    fisher: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (m, n) fp32, mean g⊙g
    importance: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (groups, k) fp32
    samples: int = 0
    mean_loss: float = 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"samples": torch.tensor(self.samples), "mean_loss": torch.tensor(self.mean_loss)}
        out.update({f"layer.{i}.{t}.fisher": v for (i, t), v in self.fisher.items()})
        out.update({f"layer.{i}.{t}.importance": v for (i, t), v in self.importance.items()})
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GradientStats:
        stats = cls(samples=int(state["samples"]), mean_loss=float(state["mean_loss"]))
        for key, value in state.items():
            if key.startswith("layer."):
                _, layer, name, kind = key.split(".")
                getattr(stats, kind)[(int(layer), name)] = value
        return stats


@contextlib.contextmanager
def _grads_only_on(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze everything but ``params`` and switch to eval mode; restore both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _sample_grads(
    model: nn.Module, sample: Any, params: list[nn.Parameter], scale: float
) -> tuple[float, tuple[torch.Tensor, ...], float]:
    """Loss, weight gradients (model dtype, times the returned scale) of one sample.

    The scale is halved and the sample redone while fp16 gradients overflow. Gradients stay in the
    model's dtype here: converting all of them to fp32 at once would double their memory on a 7B model.
    """
    while True:
        moved, out = _forward(model, sample)
        loss = answer_loss(out.logits, moved.labels)
        grads = torch.autograd.grad(loss * scale, params)
        del out
        value = float(loss.detach())
        if all(bool(torch.isfinite(g).all()) for g in grads):
            return value, grads, scale
        if not torch.isfinite(loss):
            raise CalibrationError(f"the calibration loss is {value}; the model's outputs are not finite")
        if scale <= 1.0:
            raise CalibrationError(
                "gradients on the calibration data are not finite even without loss scaling"
            )
        del grads
        scale /= 2.0


def collect_gradient_stats(
    job: DecomposeJob,
    recorder: StageRecorder,
    *,
    fisher: bool = True,
    bases: dict[tuple[int, str], ImportanceBasis] | None = None,
    samples: Sequence[Any] | None = None,
) -> GradientStats:
    """One backward pass per sample with gradients on the targeted q/k/v weights only.

    ``fisher``: accumulate ``g⊙g`` per targeted weight. ``bases``: importance scores for each spectrum,
    keyed ``(layer, name)`` like the result.
    """
    samples = list(samples if samples is not None else job.calibration or [])
    if not samples:
        raise CalibrationError("no calibration samples to collect gradient statistics from")
    bases = bases or {}
    if job.cache is not None:
        described = sorted(f"{layer}.{name}:{'+'.join(b.targets)}" for (layer, name), b in bases.items())
        parts = ("gradient_stats", f"fisher={fisher}", f"targets={job.targets}", f"bases={described}")
        state = _through_cache(
            job,
            recorder,
            "calibration: gradients",
            parts,
            samples,
            lambda: _gradient_stats(job, recorder, fisher, bases, samples).state_dict(),
        )
        return GradientStats.from_state_dict(state)
    return _gradient_stats(job, recorder, fisher, bases, samples)


def _gradient_stats(
    job: DecomposeJob,
    recorder: StageRecorder,
    fisher: bool,
    bases: dict[tuple[int, str], ImportanceBasis],
    samples: list,
) -> GradientStats:
    keys = [(layer, t) for layer in job.layers for t in job.targets]
    params = [job.projection(layer, t).weight for layer, t in keys]
    result = GradientStats()
    squares: dict[tuple[int, str], torch.Tensor] = {}
    scale = FP16_LOSS_SCALE if model_dtype(job.model) == torch.float16 else 1.0

    def fold(raw: dict[tuple[int, str], torch.Tensor], used_scale: float, layers: Any) -> None:
        """One sample's gradients of ``layers`` (times ``used_scale``) into the Fisher and importance sums."""

        def grad(key: tuple[int, str]) -> torch.Tensor:
            g = raw[key].to(job.device, torch.float32)
            return g if used_scale == 1.0 else g / used_scale

        if fisher:
            for key in raw:
                g = grad(key)
                acc = result.fisher.get(key)
                result.fisher[key] = g * g if acc is None else acc.addcmul_(g, g)
        for bkey, basis in bases.items():
            layer = bkey[0]
            if layer not in layers:
                continue
            G = torch.cat([grad((layer, t)) for t in basis.targets], dim=0)
            spec = basis.spectrum
            G = G.view(spec.groups, -1, G.shape[-1])
            # u_iᵀ G S^{-ᵀ} v_i for every i at once: (G · downᵀ) then the column-wise dot with U.
            proj = (spec.U * (G @ spec.down.transpose(1, 2))).sum(1).double()
            acc = squares.get(bkey)
            squares[bkey] = proj * proj if acc is None else acc.addcmul_(proj, proj)

    with _grads_only_on(job.model, params):
        if job.runner is not None:
            total_loss = _stream_gradients(job, recorder, samples, scale, fold)
        else:
            total_loss = 0.0
            with recorder.stage("calibration: gradients", total=len(samples)) as st:
                for sample in samples:
                    loss, raw, used_scale = _sample_grads(job.model, sample, params, scale)
                    total_loss += loss
                    fold(dict(zip(keys, raw, strict=True)), used_scale, job.layers)
                    del raw
                    st.advance()
    n = len(samples)
    for key in result.fisher:
        result.fisher[key].div_(n)
    for bkey, sq in squares.items():
        sigma = bases[bkey].spectrum.sigma.double()
        result.importance[bkey] = (sigma * (sq / n).sqrt()).float()
    result.samples = n
    result.mean_loss = total_loss / n
    return result


def _finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_host_memory(captured: list, layers: int) -> None:
    """The streamed gradient pass keeps every layer's input of every sample in host memory: refuse in one
    line, before the first layer moves, when that cannot fit."""
    need = layers * sum(c.hidden.numel() * c.hidden.element_size() for c in captured)
    available = _available_host_bytes()
    if available is not None and need > 0.9 * available:
        tokens = sum(c.hidden.shape[-2] for c in captured)
        raise CalibrationError(
            f"the layer-by-layer gradient pass keeps each layer's input: {need / 2**30:.1f} GiB of host memory "
            f"for {layers} layers x {len(captured)} samples ({tokens} tokens), {available / 2**30:.1f} GiB "
            "available; use fewer or shorter calibration samples (--calib-samples, --calib-max-length)"
        )


def _stream_gradients(job: DecomposeJob, recorder: StageRecorder, samples: list, scale: float, fold) -> float:
    """The gradient pass one decoder layer at a time (layer-wise gradient checkpointing).

    A forward stream keeps each layer's input in host memory; the head gives each sample's loss and the
    gradient at the last hidden states; then, from the last layer down, each layer is onloaded once,
    recomputed with gradients for every sample (its q/k/v weight gradients folded at once) and hands the
    gradient of its input to the layer below. The numbers are the full backward pass's: the same
    per-layer graph, fed the same upstream gradient. In fp16 the loss scale is per sample and may only
    halve on the way down (an overflowing layer is redone for that sample alone, at half the scale).
    """
    runner = job.runner
    n = runner.num_layers
    with torch.no_grad(), recorder.stage("calibration: gradients (forward)", total=n) as st:
        captured = runner.capture(samples, model_dtype(job.model))
        _check_host_memory(captured, n)
        hidden, inputs = stream_forward(runner, captured, stage=st, keep_inputs=True)
    for sample in captured:  # layer 0's input now lives in ``inputs``; free the device copy
        sample.hidden = torch.empty(0)
    scales = [scale] * len(samples)
    upstream: list[torch.Tensor | None] = []
    total = 0.0
    for s, last in enumerate(hidden):
        while True:
            x = last.detach().requires_grad_()
            with torch.enable_grad():
                loss = answer_loss(runner.head(x), samples[s].labels)
                (g,) = torch.autograd.grad(loss * scales[s], x)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise CalibrationError(f"the calibration loss is {value}; the model's outputs are not finite")
            if _finite([g]):
                break
            if scales[s] <= 1.0:
                raise CalibrationError(
                    "gradients on the calibration data are not finite even without loss scaling"
                )
            scales[s] /= 2.0
        total += value
        upstream.append(g)
    del hidden
    with recorder.stage("calibration: gradients", total=n) as st:
        for index in reversed(range(n)):
            keys = [(index, t) for t in job.targets]
            where = runner.layer_device(index)
            with runner.onload(index) as layer:
                params = [job.projection(index, t).weight for t in job.targets]
                for s, sample in enumerate(captured):
                    while True:
                        x = inputs[index][s].to(where).requires_grad_(index > 0)
                        wanted = [x, *params] if index > 0 else params
                        with torch.enable_grad():
                            out = runner.run(layer, index, x, sample)
                            grads = torch.autograd.grad(out, wanted, grad_outputs=upstream[s].to(where))
                        del out
                        if _finite(grads):
                            break
                        if scales[s] <= 1.0:
                            raise CalibrationError(
                                "gradients on the calibration data are not finite even without loss scaling"
                            )
                        scales[s] /= 2.0
                        upstream[s] = upstream[s] / 2
                    fold(dict(zip(keys, grads[-len(params) :], strict=True)), scales[s], (index,))
                    upstream[s] = grads[0] if index > 0 else None
            inputs[index] = []
            st.advance()
    return total


# -- calibration loss with replaced weights (sensitivity search) ------------------------------------
def calibration_loss(
    job: DecomposeJob,
    samples: Sequence[Any],
    replacements: dict[tuple[int, str], torch.Tensor] | None = None,
) -> float:
    """Mean answer loss over ``samples`` with some projections computing ``x Wᵀ + b`` from a new ``W``.

    The model is left untouched: each replacement is a forward hook that recomputes the projection's
    output from the given weight and the module's own bias, removed before returning.
    """
    handles = []

    def hook_for(W: torch.Tensor):
        def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return F.linear(x, W.to(x.device, x.dtype), getattr(module, "bias", None))

        return hook

    for (layer, target), W in (replacements or {}).items():
        handles.append(job.projection(layer, target).register_forward_hook(hook_for(W)))
    total = 0.0
    try:
        with torch.no_grad():
            if job.runner is not None:
                captured = job.runner.capture(samples, model_dtype(job.model))
                hidden, _ = stream_forward(job.runner, captured)
                for last, sample in zip(hidden, samples, strict=True):
                    total += float(answer_loss(job.runner.head(last), sample.labels))
                return total / len(samples)
            for sample in samples:
                moved, out = _forward(job.model, sample)
                total += float(answer_loss(out.logits, moved.labels))
    finally:
        for h in handles:
            h.remove()
    return total / len(samples)
