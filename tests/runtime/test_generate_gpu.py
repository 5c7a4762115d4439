"""Greedy generate from latents through the compiled Triton kernel on a CUDA GPU.

The tiny models have head_dim 32 (the families' tiny configs have 16, below what the compiled kernel's
score dot takes; see ``check_compiled``); they are compressed on the CPU in fp32 (calibration), then
moved to the GPU in 16 bits.
The reference is the same compressed model on the same GPU with transformers' ordinary cache of the
rebuilt K/V (the low-rank modules' outputs); the latent run uses ``backend="auto"``, which must pick
the Triton kernel for CUDA tensors. Every family, every latent structure (per-head, one shared latent,
the joint QKV latent), int8 latents, bf16, a head_dim of 128 and a prompt long enough for many
sequence splits per row.
"""

import pytest
import torch
from runtime_helpers import (
    DecodeCalls,
    assert_greedy_agrees,
    cache_of,
    compress_model,
    count_heads_kernel,
    decode_steps,
    fake_quant_forward,
    greedy,
    mha_config,
    model_from_config,
    padded_batch,
    set_bits,
)

from lowrank_kit.models.families.common import TINY_PAD
from lowrank_kit.models.tiny import family_available, tiny_config
from lowrank_kit.registry import adapter_for_config
from lowrank_kit.runtime import LatentCache, LatentDecodeGraph, LatentLayer, enable_latent_decode
from lowrank_kit.runtime.graph import GRAPH_ATTR, cache_kwarg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU to run the compiled Triton kernel"
    ),
]

NEW_TOKENS = 8
# Fraction of each row's logit range. Both runs round to 16 bits in different places: the reference
# caches K/V rounded after the up-projection, the latent path caches rounded latents and rebuilds K
# in fp32 (on the CPU twin in fp16 the difference is ~1e-3 of the range, in bf16 ~8e-3). A dropped
# bias, a wrong position or scale moves logits by ~1 of the range on these models.
TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def gpu_tiny(family: str, method: str, ratio: float = 0.5, mha: bool = False):
    """The family's tiny model with head_dim 32 (random biases and norm gains), compressed; ``mha``
    gives every query head its own KV head (the per-head kernel's case with per-head latents)."""
    config = tiny_config(family)
    text = config.get_text_config()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # Their attention derives head_dim from hidden_size / heads: 64 / 2, over one KV head.
        text.num_attention_heads, text.num_key_value_heads = 2, 1
    else:
        text.head_dim = 32
    if mha:
        mha_config(config)
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("mrope_section"):
        rope["mrope_section"] = [2 * s for s in rope["mrope_section"]]  # sums to head_dim / 2
    model = compress_model(model_from_config(config), family, method, ratio=ratio)
    assert adapter_for_config(model.config).attention_module(model, 0).head_dim == 32
    return model


def _on_gpu(model, inputs: dict, dtype: torch.dtype):
    model = model.to("cuda", dtype)
    inputs = {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in inputs.items()}
    return model, inputs


def _compare(
    model, inputs, dtype, monkeypatch, kv_int8: bool = False, reference_model_setup=None, cuda_graph=False
):
    """Greedy runs with the ordinary cache and with latents (Triton), checked token by token;
    ``cuda_graph``: generate's decode steps replay a captured graph."""
    ref = greedy(model, inputs, n=NEW_TOKENS)
    if reference_model_setup is not None:
        reference_model_setup()
    enable_latent_decode(model, cuda_graph=cuda_graph)
    calls = DecodeCalls(monkeypatch, triton=True)
    out = greedy(model, inputs, n=NEW_TOKENS)
    torch.cuda.synchronize()
    if cuda_graph:
        # Python runs the kernel entry point in the eager warm-up step and in the capture; the other
        # steps are replays, counted by the graph.
        graph = getattr(cache_of(out), GRAPH_ATTR)
        assert graph.use_graph and graph.captures == 1 and graph.steps == len(out.logits) - 1
        layers_n = model.config.get_text_config().num_hidden_layers
        assert calls.calls == calls.triton == 2 * layers_n and calls.naive == 0
    else:
        assert calls.calls == calls.triton == decode_steps(model, out) > 0 and calls.naive == 0
    layers = cache_of(out).layers
    device = inputs["input_ids"].device
    assert all(isinstance(layer, LatentLayer) and layer.k.device == device for layer in layers)
    assert (layers[0].k.dtype == torch.int8) == kv_int8
    assert_greedy_agrees(ref, out, TOL[dtype])
    return out


def _compare_int8(model, inputs, monkeypatch, cuda_graph=False):
    """Greedy runs with int8 latents against a reference whose K/V latents are fake-quantized the same way."""
    mods = set_bits(model, 8)
    fake_quant_forward(mods, 8)

    def drop_fake_quant():
        for mod in mods:
            del mod.forward

    return _compare(
        model,
        inputs,
        torch.float16,
        monkeypatch,
        kv_int8=True,
        reference_model_setup=drop_fake_quant,
        cuda_graph=cuda_graph,
    )


def _families(cases):
    return [
        pytest.param(
            f,
            m,
            marks=pytest.mark.skipif(
                not family_available(f), reason=f"this transformers lacks the {f} model class"
            ),
        )
        for f, m in cases
    ]


@pytest.mark.parametrize(
    ("family", "method"),
    _families(
        [
            ("llava", "wsvd"),
            ("llava", "svdllm"),
            ("llava", "qsvd"),
            ("llava_next", "wsvd"),
            ("smolvlm", "asvd"),
            ("qwen2_vl", "wsvd"),
            ("qwen2_vl", "qsvd"),
            ("qwen2_5_vl", "svdllm"),
            ("molmo2", "wsvd"),
        ]
    ),
)
def test_generate_on_gpu_matches_ordinary_cache(family, method, monkeypatch):
    model = gpu_tiny(family, method)
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    _compare(model, inputs, torch.float16, monkeypatch)


def test_generate_on_gpu_bf16(monkeypatch):
    model = gpu_tiny("qwen2_vl", "wsvd")
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.bfloat16)
    _compare(model, inputs, torch.bfloat16, monkeypatch)


@pytest.mark.parametrize(("family", "method"), _families([("qwen2_vl", "wsvd"), ("molmo2", "wsvd")]))
def test_generate_on_gpu_int8_latents(family, method, monkeypatch):
    """int8 latents against a reference whose K/V latents are fake-quantized the same way."""
    model = gpu_tiny(family, method)
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    _compare_int8(model, inputs, monkeypatch)


def test_generate_on_gpu_head_dim_128(monkeypatch):
    """Real head size: the K rebuild's dots at width 128 and ranks of tens, as in a 7B model."""
    config = tiny_config("llava")
    text = config.text_config
    text.hidden_size, text.intermediate_size = 256, 512
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 128
    model = compress_model(model_from_config(config), "llava", "wsvd", ratio=0.5)
    k_proj = model.model.language_model.layers[0].self_attn.k_proj
    assert k_proj.head_dim == 128 and max(k_proj.ranks) > 16
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    _compare(model, inputs, torch.float16, monkeypatch)


def test_generate_on_gpu_long_prompt(monkeypatch):
    """About 420 cached tokens per row, rows of different lengths: several sequence splits per row and
    their merge."""
    model = gpu_tiny("qwen2_vl", "wsvd")
    inputs = padded_batch(model, pad=0)
    prefix = torch.randint(4, 200, (2, 400), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prefix)
    prefix[0, :37], mask[0, :37] = TINY_PAD, 0  # row 0 is 37 tokens shorter, left-padded
    ids = inputs["input_ids"]
    for key, value in list(inputs.items()):
        if key not in ("input_ids", "attention_mask") and value.shape[:2] == ids.shape:
            # Per-token side inputs (Qwen2-VL's token types): the prefix is text, type 0.
            inputs[key] = torch.cat([value.new_zeros(2, 400, *value.shape[2:]), value], dim=1)
    inputs["input_ids"] = torch.cat([prefix, ids], dim=1)
    inputs["attention_mask"] = torch.cat([mask, inputs["attention_mask"]], dim=1)
    model, inputs = _on_gpu(model, inputs, torch.float16)
    out = _compare(model, inputs, torch.float16, monkeypatch)
    assert cache_of(out).layers[0].starts.tolist() == [37, 0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_on_gpu_per_head_kernel(family, monkeypatch):
    """MHA with per-head latents: the per-head kernel serves every decode step (Qwen2-VL: M-RoPE, K
    bias)."""
    model = gpu_tiny(family, "wsvd", mha=True)
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    heads = count_heads_kernel(monkeypatch)
    _compare(model, inputs, torch.float16, monkeypatch)
    assert heads["heads"] > 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_on_gpu_per_head_kernel_int8(family, monkeypatch):
    """The per-head kernel on int8 latents, against a reference whose latents are fake-quantized."""
    model = gpu_tiny(family, "wsvd", mha=True)
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    heads = count_heads_kernel(monkeypatch)
    _compare_int8(model, inputs, monkeypatch)
    assert heads["heads"] > 0


@pytest.mark.parametrize(
    ("family", "method", "mha"),
    [
        pytest.param(f, m, mha, marks=pytest.mark.skipif(not family_available(f), reason=f"no {f} class"))
        for f, m, mha in [
            ("llava", "wsvd", True),  # the per-head kernel
            ("qwen2_vl", "wsvd", False),  # the grouped kernel, M-RoPE positions from generate
            ("llava", "qsvd", False),  # one joint latent
            ("molmo2", "wsvd", False),  # QK-norm: the key norms written at the cursor
        ]
    ],
)
def test_generate_on_gpu_cuda_graph(family, method, mha, monkeypatch):
    """enable_latent_decode(cuda_graph=True): generate's decode steps replay one captured graph and give
    the ordinary cache's tokens."""
    model = gpu_tiny(family, method, mha=mha)
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    _compare(model, inputs, torch.float16, monkeypatch, cuda_graph=True)


def test_generate_on_gpu_cuda_graph_int8(monkeypatch):
    model = gpu_tiny("qwen2_vl", "wsvd")
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    _compare_int8(model, inputs, monkeypatch, cuda_graph=True)


def test_decode_graph_replays_equal_eager_graph_mode_steps():
    """Replays compute what the same graph-mode steps compute eagerly, also across captures forced by
    the cache growing (chunks of 4 slots, no max_length: the capacity runs out every few steps)."""
    model = gpu_tiny("llava", "wsvd", mha=True)  # compression needs gradients: outside no_grad
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    enable_latent_decode(model)
    with torch.no_grad():
        _replays_equal_eager(model, inputs)


def _replays_equal_eager(model, inputs):
    kw = cache_kwarg(model)
    caches = [LatentCache(chunk=4), LatentCache(chunk=4)]
    toks = []
    for cache in caches:
        out = model(**inputs, use_cache=True, **{kw: cache})
        toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(toks[0], toks[1])
    eager = LatentDecodeGraph(model, caches[0], use_graph=False)
    graph = LatentDecodeGraph(model, caches[1], use_graph=True)
    a = b = toks[0]
    # An 11-token prompt in 12 slots: the cache grows at steps 2, 9 and 19 (to 20, 30, 45 slots), each
    # growth an eager step and a new capture.
    for step in range(16):
        la, lb = eager.step(a).clone(), graph.step(b).clone()
        scale = (la.float().amax(-1) - la.float().amin(-1)).clamp_min(1e-6)
        err = float(((la.float() - lb.float()).abs().amax(-1) / scale).max())
        assert err < 1e-3, f"step {step}: replay differs from eager by {err:.2e} of the range"
        a = b = la.argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    assert graph.captures >= 2  # the cache grew at least once after the first capture
    assert caches[0].get_seq_length() == caches[1].get_seq_length()
    n = caches[1].layers[0].length
    for x, y in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(x.positions[:, :n], y.positions[:, :n])
        assert torch.equal(x.k[:, :n], y.k[:, :n])
    graph.close()
    eager.close()


def test_generate_on_gpu_cuda_graph_w8a8(monkeypatch):
    """A W8A8-quantized compressed model: its quantized linears run inside the captured step."""
    config = tiny_config("llava")
    config.get_text_config().head_dim = 32
    mha_config(config)
    model = compress_model(model_from_config(config), "llava", "wsvd", ratio=0.5, scheme="w8a8")
    model, inputs = _on_gpu(model, padded_batch(model, pad=3), torch.float16)
    _compare(model, inputs, torch.float16, monkeypatch, cuda_graph=True)
