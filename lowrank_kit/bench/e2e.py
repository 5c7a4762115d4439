"""End-to-end decode speed: an uncompressed model on transformers' cache against the same model
compressed by a per-head method and decoding from latents, in one run on one device.

With random weights built directly on the device (``build_random_model``; no host copy of 7B weights):

1. **baseline**: the preset's architecture (default ``llava-next-7b``) in fp16 with transformers'
   SDPA attention and its ordinary ``DynamicCache``: prefill of ``batch`` prompts of ``context``
   tokens, then ``warmup`` untimed and ``steps`` timed greedy decode steps;
2. **compression** in place: ``wsvd`` at ρ1 = ``ratio`` on q/k/v (importance ranks, so heads carry
   ragged ranks as in a real compressed model), calibrated on a few random-token samples, local
   fine-tuning off by default (it changes factor values, not the ranks or the layout decode reads);
3. **check**: on a slice (2 rows, 1024 tokens) the compressed model's logits for a prefill and three
   decode steps with the ordinary cache of rebuilt K/V, with the latent cache, and (``graph``) with the
   latent cache stepped by a :class:`~lowrank_kit.runtime.graph.LatentDecodeGraph` (an eager step, the
   captured one, a replay) must agree; a failed check reports no speedup;
4. **latent**: :func:`~lowrank_kit.runtime.enable_latent_decode` and the same prefill and decode
   (the Triton kernel on CUDA, its PyTorch twin on the CPU), with eager steps (``latent_eager``) and,
   when ``graph`` is on (the default), with the steps replayed from a CUDA graph (``latent``, the row
   the speedup is computed from; on the CPU the graph-mode steps run eagerly).

On CUDA the run also times a reference that is not the target's baseline (``static_baseline``):
the uncompressed model with transformers' ``StaticCache`` and its decode step replayed from a CUDA
graph, so the JSON shows how much of the speedup CUDA graphs alone would give the uncompressed model.

A decode step is one forward of one token per row with the cache plus the argmax that picks the next
token, as ``generate`` runs it without its bookkeeping. The timed steps are bracketed by device
synchronization; tokens/s = batch · steps / seconds. Prefill is timed on its own (logits of the last
position only). Prompts are text tokens: the vision tower is built, since it is part of the
architecture, but never runs, and decode speed does not depend on it (an image only decides which
tokens sit in the cache). ``layers`` and ``hidden_scale`` shrink the architecture for smoke runs.
``benchmarks/decode_e2e.py`` is the script (it parses the command line into :class:`E2ESettings`);
``lowrank bench speed`` runs it for any preset.
"""

from __future__ import annotations

import gc
import inspect
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from transformers.cache_utils import DynamicCache, StaticCache

from lowrank_kit.data.calibration import CalibrationSample
from lowrank_kit.errors import LowRankError
from lowrank_kit.kernels.latent_attention.launch import head_blocks, row_widths, uses_heads_kernel
from lowrank_kit.kernels.latent_attention.layout import HEADS_COLUMNS, HEADS_MAX
from lowrank_kit.models.presets import build_random_model, get_preset, preset_config
from lowrank_kit.pipeline import compress
from lowrank_kit.placement import input_device
from lowrank_kit.progress import NULL_REPORTER
from lowrank_kit.quant.schemes import resolve_scheme
from lowrank_kit.recipe import parse_recipe
from lowrank_kit.registry import adapter_for_config
from lowrank_kit.runtime import enable_latent_decode
from lowrank_kit.runtime.attention import STATE_ATTR
from lowrank_kit.runtime.cache import LatentCache, LatentLayer
from lowrank_kit.runtime.graph import LatentDecodeGraph

# Tolerance of the check, as a fraction of each row's logit range. Both runs round to the model dtype in
# different places (K/V after the up-projection vs the latents); ~1e-3 of the range was measured in
# fp16 on the CPU twin, and a wrong position, scale or bias moves logits by ~1 of the range.
CHECK_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}
CHECK_SHAPE = (2, 1024)
# Decode steps of the check: with a graph, one eager step, the captured one and a replay.
CHECK_STEPS = 3
TARGET_SPEEDUP = 1.4
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# A smoke run: 2 layers, widths and heads / 16 (head_dim kept), batch 2, 256 tokens, 4 steps, 2
# calibration samples of 64 tokens (benchmarks/decode_e2e.py --tiny, profile_decode_step.py --tiny).
TINY_RUN = dict(
    layers=2, hidden_scale=16, batch=2, context=256, steps=4, warmup=1, calib_samples=2, calib_tokens=64
)


@dataclass
class E2ESettings:
    """What one end-to-end run does (see the module docstring)."""

    arch: str = "llava-next-7b"
    device: str = "cuda"
    dtype: str = "float16"
    batch: int = 8
    context: int = 8192
    steps: int = 32
    warmup: int = 4
    layers: int | None = None
    hidden_scale: int | None = None
    method: str = "wsvd"
    ratio: float = 0.5
    allocation: str | None = None
    finetune: bool = False
    quant: str | None = None  # a quantization scheme after the decomposition, e.g. w8a16-kv8
    calib_samples: int = 8
    calib_tokens: int = 512
    check: bool = True
    graph: bool = True
    static_baseline: bool = True
    seed: int = 0

    def validate(self) -> None:

        get_preset(self.arch)  # an unknown alias lists the valid ones
        if self.quant is not None:
            resolve_scheme(self.quant)  # an unknown scheme lists the valid forms
        if self.dtype not in DTYPES:
            raise LowRankError(f"unknown dtype {self.dtype!r}; available: {', '.join(DTYPES)}")
        for name in ("batch", "context", "steps", "calib_samples", "calib_tokens"):
            if getattr(self, name) < 1:
                raise LowRankError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise LowRankError(f"warmup must be 0 or more steps, got {self.warmup}")
        if (self.graph or self.static_baseline) and self.device.startswith("cuda") and self.warmup < 2:
            raise LowRankError(
                f"CUDA-graph runs need warmup >= 2 (an eager step, then the capture), got {self.warmup}"
            )
        if self.layers is not None and self.layers < 1:
            raise LowRankError(f"layers must be at least 1, got {self.layers}")
        if self.hidden_scale is not None and self.hidden_scale < 1:
            raise LowRankError(f"hidden_scale must be at least 1, got {self.hidden_scale}")
        if not 0.0 < self.ratio <= 1.0:
            raise LowRankError(f"ratio ρ1 must be in (0, 1], got {self.ratio}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise LowRankError(
                f"device {self.device!r} was asked for, but this machine has no CUDA GPU; "
                "use --device cpu with a shrunk model (--tiny)"
            )


# -- the model ----------------------------------------------------------------------------------------
def shrunk_config(arch: str, layers: int | None = None, hidden_scale: int | None = None):
    """The preset's config with ``layers`` decoder layers and widths and head counts divided by
    ``hidden_scale`` (head_dim kept). A shrunk model also gets a two-layer vision tower; fields of the
    vision side that equal the text width (projector outputs) follow the new width."""
    config = preset_config(arch)
    text = config.get_text_config()
    if layers is not None:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types)[:layers]
    if hidden_scale is None or hidden_scale == 1:
        return config
    s = hidden_scale
    hidden, heads = text.hidden_size, text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads

    def fits(k: int) -> bool:
        return not (hidden % k or heads % k or text.intermediate_size % k or (heads // k) % max(1, kv // k))

    if not fits(s):
        valid = ", ".join(str(k) for k in range(1, heads + 1) if fits(k))
        raise LowRankError(
            f"hidden_scale {s} does not divide {arch}'s hidden size {hidden}, intermediate size "
            f"{text.intermediate_size} and {heads} query heads ({kv} KV heads) evenly; valid: {valid}"
        )
    new_kv = max(1, kv // s)
    text.hidden_size, text.intermediate_size = hidden // s, text.intermediate_size // s
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads // s, new_kv, head_dim
    for name in ("vision_config", "adapter_config"):
        sub = getattr(config, name, None)
        if sub is None:
            continue
        for attr in ("num_hidden_layers", "depth"):
            if isinstance(getattr(sub, attr, None), int):
                setattr(sub, attr, 2)
        # Widths equal to the text model's are the projector's output (Qwen2-VL's vision `hidden_size`,
        # Qwen2.5-VL's `out_hidden_size`, Molmo2's `text_hidden_size`); the towers' own widths differ.
        for attr in ("hidden_size", "out_hidden_size", "text_hidden_size"):
            if getattr(sub, attr, None) == hidden:
                setattr(sub, attr, hidden // s)
    return config


def build(settings: E2ESettings):

    config = shrunk_config(settings.arch, settings.layers, settings.hidden_scale)
    return build_random_model(
        settings.arch, dtype=DTYPES[settings.dtype], device=settings.device, seed=settings.seed, config=config
    )


def _text_id_limit(config) -> int:
    """Prompt ids are drawn below the first special id above 1000 (image, pad, bos/eos of the larger
    vocabularies), so a random prompt never holds an image placeholder."""
    vocab = config.get_text_config().vocab_size
    specials = [
        v
        for k, v in config.to_dict().items()
        if isinstance(v, int) and ("token_id" in k or "token_index" in k) and v > 1000
    ]
    return min([vocab, *specials])


def prompt_ids(model, batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, _text_id_limit(model.config), (batch, length), generator=gen)
    return ids.to(input_device(model))


def calibration_samples(model, count: int, tokens: int, seed: int) -> list:
    """Random-token samples, the last eight tokens labelled as the answer."""
    out = []
    for i in range(count):
        ids = prompt_ids(model, 1, tokens, seed + 1000 + i)
        labels = torch.full_like(ids, -100)
        labels[:, -min(8, tokens) :] = ids[:, -min(8, tokens) :]
        out.append(CalibrationSample({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    return out


# -- timing -------------------------------------------------------------------------------------------
def _cache_kwarg(model) -> str:

    # transformers 5.24 names the forward's cache argument `cache`, 5.17 `past_key_values`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_bytes(cache) -> tuple[int, int]:
    """(bytes the cached tokens occupy, bytes allocated): equal for transformers' K/V layers; a latent
    layer allocates whole chunks."""
    used = allocated = 0
    for layer in cache.layers:
        if isinstance(layer, LatentLayer):
            n = layer.nbytes()
            allocated += n
            used += n * layer.length // max(layer.capacity, 1)
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    used += t.numel() * t.element_size()
                    allocated += t.numel() * t.element_size()
    return used, allocated


def _new_cache(model, latent: bool, max_length: int):
    """transformers' default cache, or a latent cache allocated once for ``max_length`` tokens (a
    growing one would copy itself when decoding passes the prompt, holding both copies for a moment)."""

    return LatentCache(max_length=max_length) if latent else DynamicCache(config=model.config)


def _static_cache(model, max_length: int):

    return StaticCache(config=model.config, max_cache_len=max_length)


class _StaticGraph:
    """transformers' own graph-friendly decode: a ``StaticCache`` (written at a device-side length) and a
    one-token forward captured once and replayed, the reference for what CUDA graphs alone give."""

    def __init__(self, model, cache, kw: str, batch: int, device: torch.device) -> None:
        self.model, self.cache, self.kw = model, cache, kw
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.eager = 0
        self.device = device

    def _body(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, use_cache=True, **{self.kw: self.cache}).logits[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(tok)
        if self.eager < 1:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                logits = self._body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.eager += 1
            return logits
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._body()
        self.graph.replay()
        return self.logits


def decode_stepper(model, cache, mode: str, batch: int, device: torch.device):
    """``(step, runner)``: ``step(tok) -> logits [B, vocab]`` runs one decode step of ``model`` on the
    prefilled ``cache`` the way ``mode`` says (see :func:`measure`); ``runner`` is the graph object (or
    None; close a :class:`~lowrank_kit.runtime.graph.LatentDecodeGraph` after use)."""
    if mode not in ("eager", "graph", "static_graph"):
        raise LowRankError(f"unknown decode mode {mode!r}; available: eager, graph, static_graph")
    kw = _cache_kwarg(model)
    if mode == "graph":
        runner = LatentDecodeGraph(model, cache, use_graph=device.type == "cuda")
        return runner.step, runner
    if mode == "static_graph":
        if device.type != "cuda":
            raise LowRankError("the static-cache CUDA graph baseline needs a CUDA device")
        runner = _StaticGraph(model, cache, kw, batch, device)
        return runner.step, runner

    def step(t):
        return model(input_ids=t, use_cache=True, **{kw: cache}).logits[:, -1]

    return step, None


def new_decode_cache(model, mode: str, latent: bool, max_length: int):
    """The cache a run of ``mode`` prefills: transformers' ``StaticCache`` for "static_graph", else
    :func:`_new_cache`."""
    if mode == "static_graph":
        return _static_cache(model, max_length)
    return _new_cache(model, latent, max_length)


@torch.no_grad()
def measure(
    model, ids: torch.Tensor, steps: int, warmup: int, latent: bool, mode: str = "eager"
) -> dict[str, Any]:
    """Prefill ``ids``, then ``warmup`` + ``steps`` greedy decode steps; seconds, tokens/s, memory.

    ``mode``: "eager" (one forward per step, as ``generate`` runs it), "graph" (latent: the steps replay a
    :class:`~lowrank_kit.runtime.graph.LatentDecodeGraph`) or "static_graph" (baseline: transformers'
    ``StaticCache`` and the step replayed from a CUDA graph); the first warm-up step of a graph mode runs
    eagerly and the second captures.
    """
    device = ids.device
    kw = _cache_kwarg(model)
    cache = new_decode_cache(model, mode, latent, ids.shape[1] + warmup + steps)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    step, runner = decode_stepper(model, cache, mode, ids.shape[0], device)
    for _ in range(warmup):
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok).argmax(-1, keepdim=True)
    _sync(device)
    decode_s = time.perf_counter() - t1
    batch, context = ids.shape
    used, allocated = _cache_bytes(cache)
    res = {
        "mode": mode,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * context / prefill_s,
        "decode_s": decode_s,
        "ms_per_step": 1e3 * decode_s / steps,
        "decode_tokens_per_s": batch * steps / decode_s,
        "cache_bytes": used,
        "cache_bytes_allocated": allocated,
        "cache_layer_type": type(cache.layers[0]).__name__,
        "cached_tokens_at_end": int(cache.get_seq_length()),
        "last_tokens_finite": bool(torch.isfinite(out.logits).all()),
    }
    if mode == "graph":
        res["graph"] = {"captures": runner.captures, "steps": runner.steps, "cuda_graph": runner.use_graph}
    if device.type == "cuda":
        res["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if isinstance(runner, LatentDecodeGraph):
        runner.close()
    del cache, out, runner
    return res


@torch.no_grad()
def _logits(
    model, ids: torch.Tensor, latent: bool, steps: int = CHECK_STEPS, graph: bool = False
) -> list[torch.Tensor]:
    """Logits of the prefill's last position and of ``steps`` greedy decode steps; ``graph``: the steps go
    through a :class:`~lowrank_kit.runtime.graph.LatentDecodeGraph` (on CUDA: one eager step, then the
    captured one, then replays)."""
    kw = _cache_kwarg(model)
    cache = _new_cache(model, latent, ids.shape[1] + steps)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    logits = [out.logits[:, -1].float()]
    runner = LatentDecodeGraph(model, cache) if graph else None
    for _ in range(steps):
        tok = logits[-1].argmax(-1, keepdim=True)
        if runner is not None:
            logits.append(runner.step(tok).float().clone())  # the graph's buffer is overwritten next step
        else:
            logits.append(model(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1].float())
    if runner is not None:
        runner.close()
    if latent and type(cache.layers[0]).__name__ != "LatentLayer":
        raise LowRankError("the latent check ran without a latent cache; enable_latent_decode did not take")
    return logits


def _measure_or_oom(model, ids, steps: int, warmup: int, latent: bool, mode: str = "eager") -> dict[str, Any]:
    """:func:`measure`, or the reason it could not run at this shape (out of device memory; for the
    static-cache reference, any failure of transformers' own cache or its capture, recorded)."""
    try:
        return measure(model, ids, steps, warmup, latent, mode)
    except torch.OutOfMemoryError as err:
        gc.collect()
        torch.cuda.empty_cache()
        return {"mode": mode, "error": f"out of GPU memory: {str(err).splitlines()[0][:200]}"}
    except Exception as err:  # only the reference row may fail (and is reported)
        if mode != "static_graph":
            raise
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"mode": mode, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}


def _agreement(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Worst |Δlogit| over steps and rows, as a fraction of the row's reference logit range. Both runs
    feed back their own argmax; where they pick different tokens the later steps differ legitimately, so
    steps after the first disagreement are left out."""
    worst = 0.0
    for a, b in zip(got, ref):
        scale = (b.amax(-1) - b.amin(-1)).clamp_min(1e-6)
        worst = max(worst, float(((a - b).abs().amax(-1) / scale).max()))
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break
    return worst


# -- the run ------------------------------------------------------------------------------------------
def _rank_stats(report: dict[str, Any]) -> dict[str, Any]:
    """Per target: the latent kind and min / mean / max rank over layers (and heads)."""
    per: dict[str, list[int]] = {}
    kinds: dict[str, set[str]] = {}
    for entry in report.get("ranks", {}).values():
        for target, spec in entry.items():
            per.setdefault(target, []).extend(spec["ranks"] if spec["kind"] == "per_head" else [spec["rank"]])
            kinds.setdefault(target, set()).add(spec["kind"])
    return {
        t: {"kind": "/".join(sorted(kinds[t])), "min": min(v), "mean": statistics.mean(v), "max": max(v)}
        for t, v in per.items()
    }


def _environment(device: torch.device) -> dict[str, Any]:

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        import triton

        env["triton"] = triton.__version__
    return env


def compress_for_run(model, settings: E2ESettings, reporter=None):
    """Compress ``model`` in place as a run does: ``settings.method`` at ρ1 = ``settings.ratio`` on
    q/k/v (its rank allocation, wsvd's fine-tuning as set), then ``settings.quant`` if set, calibrated on
    random-token samples."""
    step: dict[str, Any] = {"type": "decompose", "method": settings.method, "ratio": settings.ratio}
    if settings.allocation:
        step["rank_allocation"] = settings.allocation
    if settings.method == "wsvd":
        step["params"] = {"finetune": settings.finetune}
    steps = [step] + ([{"type": "quantize", "scheme": settings.quant}] if settings.quant else [])
    recipe = parse_recipe({"model": settings.arch, "steps": steps}, origin="decode_e2e")
    samples = calibration_samples(model, settings.calib_samples, settings.calib_tokens, settings.seed)
    return compress(model, recipe, calibration=samples, reporter=reporter or NULL_REPORTER)


def run_e2e(
    settings: E2ESettings,
    shapes: list[tuple[int, int]] | None = None,
    say=lambda line: None,
    reporter=None,
) -> dict[str, Any]:
    """One run (module docstring); ``shapes``: (batch, context) pairs, default the settings' one.

    Returns the results as a JSON-ready dict; ``rows`` holds one entry per shape with both sides and the
    speedup (None where the check failed).
    """
    settings.validate()
    shapes = shapes or [(settings.batch, settings.context)]
    device = torch.device(settings.device)
    dtype = DTYPES[settings.dtype]
    t_start = time.perf_counter()
    res: dict[str, Any] = {"benchmark": "decode_e2e", "settings": asdict(settings), **_environment(device)}

    say(f"building {settings.arch} with random weights on {device} ({settings.dtype})")
    _sync(device)
    t0 = time.perf_counter()
    model = build(settings)
    _sync(device)
    res["build_model_s"] = time.perf_counter() - t0
    text = model.config.get_text_config()
    info = adapter_for_config(model.config).info(model)
    res["architecture"] = {
        "layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "heads": info.num_heads,
        "kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "attention": getattr(model.config, "_attn_implementation", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "inputs": "text tokens only; the vision tower is built but never runs",
    }

    rows = [{"batch": b, "context": c} for b, c in shapes]
    for row in rows:
        ids = prompt_ids(model, row["batch"], row["context"], settings.seed)
        say(f"baseline B={row['batch']} context={row['context']}: prefill + {settings.steps} decode steps")
        row["baseline"] = _measure_or_oom(model, ids, settings.steps, settings.warmup, latent=False)
        say(f"  baseline {_rate(row['baseline'])}")
        if settings.static_baseline and device.type == "cuda":
            say("  reference: transformers' StaticCache, decode steps replayed from a CUDA graph")
            row["baseline_static_graph"] = _measure_or_oom(
                model, ids, settings.steps, settings.warmup, latent=False, mode="static_graph"
            )
            say(f"  baseline (static cache, CUDA graph) {_rate(row['baseline_static_graph'])}")
        del ids

    say(f"compressing: {settings.method} at ρ1 = {settings.ratio}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _sync(device)
    t0 = time.perf_counter()
    result = compress_for_run(model, settings, reporter)
    _sync(device)
    report = result.report
    res["compression"] = {
        "method": settings.method,
        "quant": settings.quant,
        "recipe": result.recipe.model_dump(mode="json"),
        "seconds": time.perf_counter() - t0,
        "rho1": report["rho1"],
        "rho2": report["rho2"],
        "cache_elements_per_token_per_layer": report.get("cache_elements_per_token"),
        "original_cache_elements_per_token_per_layer": report.get("original_cache_elements_per_token"),
        "ranks": _rank_stats(report),
        "calibration": f"{settings.calib_samples} random-token samples of {settings.calib_tokens} tokens",
    }
    del result
    say(f"  ρ1 {report['rho1']:.4f}, ρ2 {report['rho2']:.4f}")

    check: dict[str, Any] = {"ran": settings.check}
    if settings.check:
        cb, cc = min(CHECK_SHAPE[0], shapes[0][0]), min(CHECK_SHAPE[1], shapes[0][1])
        ids = prompt_ids(model, cb, cc, settings.seed + 1)
        ref = _logits(model, ids, latent=False)
    enable_latent_decode(model)
    backend = "triton" if device.type == "cuda" else "naive"
    if settings.check:
        got = _logits(model, ids, latent=True)
        err = _agreement(ref, got)
        tol = CHECK_TOL[dtype]
        check.update(
            batch=cb,
            context=cc,
            decode_steps=len(got) - 1,
            max_rel_logit_diff=err,
            tolerance=tol,
            ok=bool(err < tol) and math.isfinite(err),
        )
        say(f"check: latent vs rebuilt-K/V logits differ by {err:.2e} of the range (tolerance {tol:.0e})")
        if settings.graph:
            # The graph's steps (eager, captured, replayed) against the same reference.
            got = _logits(model, ids, latent=True, graph=True)
            gerr = _agreement(ref, got)
            check.update(
                graph_max_rel_logit_diff=gerr, ok=check["ok"] and bool(gerr < tol) and math.isfinite(gerr)
            )
            say(f"check: latent decode graph vs rebuilt-K/V logits differ by {gerr:.2e} of the range")
        del ids, ref, got
    res["check"] = check
    res["latent_backend"] = backend
    res["per_head_programs"] = _per_head_programs(model, device, DTYPES[settings.dtype])

    for row in rows:
        ids = prompt_ids(model, row["batch"], row["context"], settings.seed)
        say(f"latent B={row['batch']} context={row['context']}: prefill + {settings.steps} decode steps")
        row["latent_eager"] = _measure_or_oom(model, ids, settings.steps, settings.warmup, latent=True)
        say(f"  latent, eager steps {_rate(row['latent_eager'])}")
        if settings.graph:
            row["latent"] = _measure_or_oom(
                model, ids, settings.steps, settings.warmup, latent=True, mode="graph"
            )
            say(f"  latent, steps replayed from a CUDA graph {_rate(row['latent'])}")
        else:
            row["latent"] = row["latent_eager"]
        del ids
        base, lat = row["baseline"], row["latent"]
        row["speedup"] = _ratio(lat, base, check)
        row["speedup_eager"] = _ratio(row["latent_eager"], base, check)
        if "baseline_static_graph" in row:
            row["speedup_vs_static_graph"] = _ratio(lat, row["baseline_static_graph"], check)
        both = "error" not in base and "error" not in lat
        row["cache_bytes_ratio"] = lat["cache_bytes"] / base["cache_bytes"] if both else None
        say("  speedup " + ("n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x"))
    res["rows"] = rows
    res["target_speedup"] = TARGET_SPEEDUP
    res["notes"] = [
        "baseline: transformers' DynamicCache appends by concatenating each layer's K/V every step, as "
        "generate() does with its default cache; that copy is part of what the baseline costs",
        "decode step: one forward of one token per row with the cache plus the argmax; no generate() "
        "bookkeeping on either side",
        "peak_gpu_memory_bytes: torch.cuda.max_memory_allocated over prefill and decode, weights included",
        "latent: decode steps replayed from a LatentDecodeGraph (CUDA graph) when settings.graph, else eager; "
        "latent_eager: the same steps issued from Python, one forward per step",
        "baseline_static_graph (reference, not the target's baseline): transformers' StaticCache with each "
        "decode step replayed from a CUDA graph, i.e. what graph capture alone gives the uncompressed model",
    ]
    res["elapsed_s"] = time.perf_counter() - t_start
    return res


def _per_head_programs(model, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    """Programs of the per-head kernel a decode step launches per row and split, summed over layers: with
    the runtime's packed head order and with heads in index order (the layout before packing), next to the
    lower bound of Σ widths / 128 columns. None where no layer runs the per-head kernel."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return None
    packed = index = bound = layers = 0
    for rt in state.layers:
        w = rt.factors.materialize(device, dtype).weights
        if not uses_heads_kernel(w):
            continue
        kw, vw = w.k_layout.widths, w.v_layout.widths
        packed += len(head_blocks(*row_widths(w), HEADS_COLUMNS, HEADS_MAX))
        index += len(head_blocks(kw, vw, HEADS_COLUMNS, HEADS_MAX))
        bound += -(-max(sum(kw), sum(vw)) // HEADS_COLUMNS)
        layers += 1
    if not layers:
        return None
    return {"layers": layers, "packed_order": packed, "index_order": index, "lower_bound": bound}


def _rate(side: dict[str, Any]) -> str:
    if "error" in side:
        return side["error"]
    return f"{side['decode_tokens_per_s']:.1f} tok/s ({side['ms_per_step']:.2f} ms/step)"


def _ratio(fast: dict[str, Any], slow: dict[str, Any], check: dict[str, Any]) -> float | None:
    """Decode tokens/s of ``fast`` over ``slow``; None where either failed or the latent check did."""
    if "error" in fast or "error" in slow or not check.get("ok", False):
        return None
    return fast["decode_tokens_per_s"] / slow["decode_tokens_per_s"]


def summary_line(res: dict[str, Any]) -> str:
    """One line: model, shape, tokens/s of both sides, speedup and whether the target is met."""
    s = res["settings"]
    parts = []

    def rate(side: dict[str, Any]) -> str:
        return side["error"] if "error" in side else f"{side['decode_tokens_per_s']:.1f} tok/s"

    for row in res["rows"]:
        sp = row["speedup"]
        if sp is not None:
            met = "met" if sp >= res["target_speedup"] else "missed"
            verdict = f"{sp:.2f}x (target {res['target_speedup']}x {met})"
        elif not res["check"].get("ok", False):
            verdict = "n/a: the latent check failed" if res["check"]["ran"] else "n/a: check not run"
        else:
            verdict = "n/a"
        extra = ""
        if s.get("graph") and row.get("speedup_eager") is not None:
            extra += f"; eager steps {row['speedup_eager']:.2f}x"
        if row.get("speedup_vs_static_graph") is not None:
            extra += f"; vs StaticCache + CUDA graph {row['speedup_vs_static_graph']:.2f}x"
        graphed = ", CUDA graph" if row["latent"].get("graph", {}).get("cuda_graph") else ""
        parts.append(
            f"B={row['batch']} ctx={row['context']}: HF {rate(row['baseline'])} vs {s['method']} "
            f"ρ1={s['ratio']} latent ({res['latent_backend']}{graphed}) {rate(row['latent'])} = {verdict}{extra}"
        )
    return f"decode_e2e {s['arch']} {s['dtype']} on {res['device']}: " + "; ".join(parts)
