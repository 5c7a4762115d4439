"""Helpers for the runtime tests: compressed tiny models, left-padded batches, greedy runs, comparisons."""

import pytest
import torch

# tests/ is on sys.path (its conftest.py puts it there), so the checkpoint tests' helpers import as a package.
from checkpoint.ckpt_helpers import samples_for

import lowrank_kit
from lowrank_kit.loading import model_class_for
from lowrank_kit.models.families.common import TINY_PAD
from lowrank_kit.models.tiny import TINY_FAMILIES, build_tiny_model, family_available, tiny_inputs
from lowrank_kit.modules import JointLowRankProjection, PerHeadLowRankLinear
from lowrank_kit.recipe import parse_recipe

METHODS = ("svd", "asvd", "svdllm", "qsvd", "wsvd")
NEW_TOKENS = 6
# Both paths run in fp32 and differ only in summation order (K rebuilt as latent·U_K, V applied after the
# softmax, the softmax over the cache); measured differences are ~2e-7 relative. A wrong position, scale,
# bias or norm moves logits by 1e-2 or more.
FP32_TOL = 1e-5

FAMILIES = [
    pytest.param(
        f,
        marks=pytest.mark.skipif(
            not family_available(f), reason=f"this transformers lacks the {f} model class"
        ),
    )
    for f in TINY_FAMILIES
]


def recipe_for(family: str, method: str, ratio: float = 0.6, targets=None, scheme: str | None = None):
    step = {"type": "decompose", "method": method, "ratio": ratio}
    if targets is not None:
        step["targets"] = list(targets)
    steps = [step]
    if scheme is not None:
        # Max scaling instead of the clip grid search: other integers, the same modules.
        steps.append({"type": "quantize", "scheme": scheme, "params": {"rtn": {"clip_search": False}}})
    return parse_recipe({"model": family, "steps": steps}, origin="test")


def perturb(model, seed: int = 11):
    """Random biases and norm gains, in place; returns ``model``.

    transformers initializes every bias to zero and every norm gain to one, so on a freshly built tiny
    model a dropped K/V bias, an unfolded QK-norm gain or a gain folded twice changes nothing. These
    values make each of them move logits by far more than the comparison tolerance.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif leaf == "weight" and "norm" in name:
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=gen))
    return model


def compress_model(model, family: str, method: str, ratio: float = 0.6, targets=None, scheme=None):
    """``model`` with random biases and norm gains (:func:`perturb`), compressed by ``method``."""
    recipe = recipe_for(family, method, ratio, targets, scheme)
    perturb(model)
    return lowrank_kit.compress(model, recipe, calibration=samples_for(model)).model


def compressed_tiny(family: str, method: str, ratio: float = 0.6, seed: int = 0, targets=None, scheme=None):
    return compress_model(build_tiny_model(family, seed=seed), family, method, ratio, targets, scheme)


def mha_config(config):
    """``config`` (edited in place) with one KV head per query head: the tiny families are GQA, and
    per-head latents of an MHA model are what the per-head decode kernel serves."""
    text = config.get_text_config()
    text.num_key_value_heads = text.num_attention_heads
    return config


def count_heads_kernel(monkeypatch) -> dict[str, int]:
    """Counts launch decisions for the per-head kernel (``heads_launch_config`` calls)."""
    from lowrank_kit.kernels.latent_attention import launch

    counts = {"heads": 0}
    original = launch.heads_launch_config

    def spy(*args, **kwargs):
        counts["heads"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(launch, "heads_launch_config", spy)
    return counts


def model_from_config(config, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class_for(config)._from_config(config, dtype=torch.float32).eval()


class DecodeCalls:
    """Counts the decode steps that went through the latent kernel entry point, and which backend ran.

    Without it a comparison of generations could pass with the kernel never called (a decode step sent
    down the prefill path computes the same tokens).
    """

    def __init__(self, monkeypatch, triton: bool = False) -> None:
        import lowrank_kit.kernels.latent_attention as entry
        import lowrank_kit.runtime.attention as attention
        from lowrank_kit.kernels.latent_attention import naive

        self.calls = 0
        self.backends: list[str] = []
        self.naive = 0
        self.triton = 0
        entry_fn, naive_fn = attention.latent_attention_decode, naive.latent_attention_decode
        if triton:  # imports Triton, so only where the test runs it
            from lowrank_kit.kernels.latent_attention import triton as triton_impl

            triton_fn = triton_impl.latent_attention_decode

            def spy_triton(*args, **kwargs):
                self.triton += 1
                return triton_fn(*args, **kwargs)

            monkeypatch.setattr(triton_impl, "latent_attention_decode", spy_triton)

        def spy_entry(*args, backend="auto", **kwargs):
            self.calls += 1
            self.backends.append(backend)
            return entry_fn(*args, backend=backend, **kwargs)

        def spy_naive(*args, **kwargs):
            self.naive += 1
            return naive_fn(*args, **kwargs)

        monkeypatch.setattr(attention, "latent_attention_decode", spy_entry)
        monkeypatch.setattr(naive, "latent_attention_decode", spy_naive)
        assert entry.latent_attention_decode is entry_fn  # the runtime calls the public entry point


def decode_steps(model, out) -> int:
    """Kernel calls a greedy run must make: one per decoder layer for every token after the first."""
    return model.config.get_text_config().num_hidden_layers * (len(out.logits) - 1)


def padded_batch(model, pad: int = 2, seed: int = 3) -> dict:
    """Two rows; the first is ``pad`` tokens shorter, left-padded (its first text tokens become padding)."""
    inputs = tiny_inputs(model, batch=2, seed=seed)
    inputs["input_ids"][0, :pad] = TINY_PAD
    inputs["attention_mask"][0, :pad] = 0
    return inputs


def greedy(model, inputs, n: int = NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )


def cache_of(out):
    # transformers 5.24 calls the output's cache `cache`, 5.17 `past_key_values`.
    return out.cache if "cache" in out else out.past_key_values


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_same_generation(ref, out, tol: float = FP32_TOL) -> None:
    assert torch.equal(out.sequences, ref.sequences), (out.sequences.tolist(), ref.sequences.tolist())
    assert len(out.logits) == len(ref.logits)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        err = rel(a, b)
        assert err < tol, f"step {step}: logits differ by {err:.2e} (tolerance {tol:.0e})"


def assert_greedy_agrees(ref, out, tol: float) -> None:
    """16-bit runs: logits agree within ``tol`` at every step up to where a row's tokens first differ, and
    a row may diverge only where the reference's top two logits are within ``tol`` of each other (a tie
    that rounding decides either way); after that its continuations are different prompts."""
    prompt = ref.sequences.shape[1] - len(ref.logits)
    live = torch.ones(ref.sequences.shape[0], dtype=torch.bool)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        a, b = a.float(), b.float()
        scale = b.abs().amax(dim=-1)
        for row in live.nonzero().flatten().tolist():
            err = float((a[row] - b[row]).abs().max() / scale[row])
            assert err < tol, (
                f"step {step} row {row}: logits differ by {err:.2e} of their range (tol {tol:.0e})"
            )
            t_ref, t_out = ref.sequences[row, prompt + step], out.sequences[row, prompt + step]
            if t_ref != t_out:
                gap = float((b[row, t_ref] - b[row, t_out]) / scale[row])
                assert gap < tol, (
                    f"step {step} row {row}: tokens differ with a reference logit gap of {gap:.2e}"
                )
                live[row] = False


# -- quantized latents ------------------------------------------------------------------------------
def _blocks(mod) -> list[int]:
    """Widths of the latent's quantization groups: one per head for per-head latents, else one."""
    return list(mod.ranks) if isinstance(mod, PerHeadLowRankLinear) else [mod.rank]


def _fake_quant(c: torch.Tensor, widths: list[int], bits: int) -> torch.Tensor:
    """Symmetric per (token, group) quantize → dequantize on the unpacked latent, written independently
    of the runtime (which quantizes packed rows)."""
    qmax = 2 ** (bits - 1) - 1
    out = []
    for block in c.split(widths, dim=-1):
        s = block.abs().amax(dim=-1, keepdim=True) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        out.append(torch.round(block / s).clamp(-qmax, qmax) * s)
    return torch.cat(out, dim=-1)


def set_bits(model, bits: int) -> list:
    mods = []
    for layer in model.model.language_model.layers:
        for name in ("k_proj", "v_proj"):
            mod = getattr(layer.self_attn, name)
            mod.kv_bits = bits
            mods.append(mod)
    return mods


def fake_quant_forward(mods, bits: int) -> None:
    for mod in mods:
        latent = mod.latent if not isinstance(mod, JointLowRankProjection) else mod.shared
        widths = _blocks(mod)

        def forward(x, mod=mod, latent=latent, widths=widths):
            return mod.up(_fake_quant(latent(x), widths, bits))

        mod.forward = forward
