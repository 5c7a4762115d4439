"""Graph-mode decode steps (lowrank_kit.runtime.graph) on the CPU.

CUDA graphs need a GPU (tests/runtime/test_generate_gpu.py captures and replays them); here the same
graph-mode step runs eagerly: the latents go to the slot a device cursor names, the kernel's twin reads
the rows' ends from the cursor over the whole capacity, positions come from the cache. Each test
compares against the ordinary decode path of the same compressed model.
"""

import pytest
import torch
from runtime_helpers import (
    FAMILIES,
    DecodeCalls,
    assert_same_generation,
    cache_of,
    compressed_tiny,
    decode_steps,
    greedy,
    padded_batch,
    rel,
    set_bits,
)

from lowrank_kit.models.tiny import tiny_inputs
from lowrank_kit.runtime import LatentCache, LatentDecodeError, enable_latent_decode
from lowrank_kit.runtime.graph import GRAPH_ATTR, LatentDecodeGraph, cache_kwarg

STEPS = 5


def _prefill(model, inputs, cache):
    kw = cache_kwarg(model)
    with torch.no_grad():
        out = model(**inputs, use_cache=True, **{kw: cache})
    return out.logits[:, -1]


def _eager_steps(model, cache, tok, n):
    kw = cache_kwarg(model)
    logits = []
    with torch.no_grad():
        for _ in range(n):
            step = model(input_ids=tok, use_cache=True, **{kw: cache}).logits[:, -1]
            logits.append(step)
            tok = step.argmax(-1, keepdim=True)
    return logits


def _graph_steps(graph, tok, n):
    logits = []
    for _ in range(n):
        step = graph.step(tok).clone()
        logits.append(step)
        tok = step.argmax(-1, keepdim=True)
    return logits


def _assert_close(ref, got, tol=1e-5):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {i}: tokens differ"
        assert rel(a, b) < tol, f"step {i}: logits differ by {rel(a, b):.2e}"


@pytest.mark.parametrize("method", ["wsvd", "svdllm", "qsvd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_graph_mode_matches_ordinary_cache(family, method, monkeypatch):
    """enable_latent_decode(cuda_graph=True): generate's decode steps go through a LatentDecodeGraph (eager
    graph mode on the CPU) and give the ordinary cache's tokens and logits, left padding included."""
    model = compressed_tiny(family, method)
    inputs = padded_batch(model)
    ref = greedy(model, inputs)
    enable_latent_decode(model, cuda_graph=True)
    calls = DecodeCalls(monkeypatch)
    out = greedy(model, inputs)
    assert calls.calls == calls.naive == decode_steps(model, out) > 0
    cache = cache_of(out)
    graph = getattr(cache, GRAPH_ATTR)
    assert isinstance(graph, LatentDecodeGraph)
    assert graph.steps == len(out.logits) - 1  # every step after the prefill went through the graph
    total = inputs["input_ids"].shape[1] + len(out.logits) - 1
    assert all(layer.length == total for layer in cache.layers)
    assert all(layer.cursor is graph._cursor for layer in cache.layers)
    assert int(graph._cursor.slot) == total and graph._cursor.ends.tolist() == [total + 1] * 2
    assert_same_generation(ref, out)


def test_steps_match_eager_and_the_cache_grows():
    """A cache that runs out of slots grows (a new allocation, so a new capture on CUDA) mid-decode."""
    model = compressed_tiny("llava", "wsvd")
    inputs = padded_batch(model)
    enable_latent_decode(model)
    ref_cache, cache = LatentCache(chunk=2), LatentCache(chunk=2)
    tok = _prefill(model, inputs, ref_cache).argmax(-1, keepdim=True)
    assert torch.equal(_prefill(model, inputs, cache).argmax(-1, keepdim=True), tok)
    ref = _eager_steps(model, ref_cache, tok, STEPS)
    start = cache.layers[0].capacity
    graph = LatentDecodeGraph(model, cache, use_graph=False)
    got = _graph_steps(graph, tok, STEPS)
    _assert_close(ref, got)
    assert cache.layers[0].capacity > start  # it grew on the way
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    for a, b in zip(cache.layers, ref_cache.layers):
        n = a.length
        assert torch.equal(a.positions[:, :n], b.positions[:, :n])
        assert torch.allclose(a.k[:, :n].float(), b.k[:, :n].float(), atol=1e-6)
    graph.close()
    assert all(layer.cursor is None for layer in cache.layers)
    # After close the cache decodes eagerly from where the graph left it.
    more_ref = _eager_steps(model, ref_cache, ref[-1].argmax(-1, keepdim=True), 2)
    more = _eager_steps(model, cache, got[-1].argmax(-1, keepdim=True), 2)
    _assert_close(more_ref, more)
    with pytest.raises(LatentDecodeError, match="closed"):
        graph.step(tok)


def test_int8_latents_and_mrope_positions():
    """int8 latents (scales written at the cursor) on Qwen2-VL, whose positions have three components and,
    after an image, run behind the cache length: the graph continues each row from its last cached
    position. (Unpadded rows: a bare forward without a mask, as the reference here runs, would number a
    left-padded row's decode positions differently from its prefill; generate's are tested above.)"""
    model = compressed_tiny("qwen2_vl", "wsvd")
    set_bits(model, 8)
    inputs = tiny_inputs(model, batch=2, seed=3)
    enable_latent_decode(model)
    ref_cache, cache = LatentCache(), LatentCache()
    tok = _prefill(model, inputs, ref_cache).argmax(-1, keepdim=True)
    _prefill(model, inputs, cache)
    assert cache.layers[0].k.dtype == torch.int8
    ref = _eager_steps(model, ref_cache, tok, STEPS)
    with LatentDecodeGraph(model, cache, use_graph=False) as graph:
        assert graph._pos.shape == (3, 2, 1)
        got = _graph_steps(graph, tok, STEPS)
    _assert_close(ref, got)
    n = cache.layers[0].length
    assert int(cache.layers[0].positions[0, n - 1, 0]) < n - 1  # image tokens share positions
    for a, b in zip(cache.layers, ref_cache.layers):
        assert torch.equal(a.k[:, :n], b.k[:, :n]) and torch.equal(a.k_scale[:, :n], b.k_scale[:, :n])
        assert torch.equal(a.positions[:, :n], b.positions[:, :n])


def test_a_changed_cache_is_reattached():
    """Cropping the cache under a graph moves the cursor back (a new capture on CUDA), not a stale slot."""
    model = compressed_tiny("llava", "svd")
    inputs = padded_batch(model)
    enable_latent_decode(model)
    cache = LatentCache()
    tok = _prefill(model, inputs, cache).argmax(-1, keepdim=True)
    graph = LatentDecodeGraph(model, cache, use_graph=False)
    first = _graph_steps(graph, tok, 3)
    cache.crop(-2)  # drop the last two tokens: the cache is back after the first step
    assert all(layer.cursor is None for layer in cache.layers)
    again = _graph_steps(graph, first[0].argmax(-1, keepdim=True), 2)
    _assert_close(first[1:], again)
    assert int(graph._cursor.slot) == cache.get_seq_length()


def test_errors():
    model = compressed_tiny("llava", "svd")
    inputs = padded_batch(model)
    with pytest.raises(LatentDecodeError, match="not latent-enabled"):
        LatentDecodeGraph(model, LatentCache())
    with pytest.raises(LatentDecodeError, match="naive"):
        enable_latent_decode(model, backend="naive", cuda_graph=True)
    enable_latent_decode(model)
    with pytest.raises(LatentDecodeError, match="no layers"):
        LatentDecodeGraph(model, LatentCache())
    cache = LatentCache()
    _prefill(model, inputs, cache)
    with pytest.raises(LatentDecodeError, match="CUDA graphs need a CUDA cache"):
        LatentDecodeGraph(model, cache, use_graph=True)
    with pytest.raises(LatentDecodeError, match="warmup"):
        LatentDecodeGraph(model, cache, use_graph=False, warmup=0)
    graph = LatentDecodeGraph(model, cache, use_graph=False)
    with pytest.raises(LatentDecodeError, match=r"input_ids of shape \[2, 1\]"):
        graph.step(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(LatentDecodeError, match="position_ids of shape"):
        graph.step(torch.zeros(2, 1, dtype=torch.long), position_ids=torch.zeros(2, 1, dtype=torch.long))
        graph.step(torch.zeros(2, 1, dtype=torch.long), position_ids=torch.zeros(3, 2, 1, dtype=torch.long))
    # A forward into a cache the graph holds (several tokens, or one outside graph.step) is refused, not
    # written at the cursor without advancing it.
    kw = cache_kwarg(model)
    for ids in (inputs["input_ids"][:, :3], inputs["input_ids"][:, :1]):
        with pytest.raises(LatentDecodeError, match="held by a LatentDecodeGraph"), torch.no_grad():
            model(input_ids=ids, use_cache=True, **{kw: cache})
    graph.close()
    with torch.no_grad():  # released: the cache decodes eagerly again
        model(input_ids=inputs["input_ids"][:, :1], use_cache=True, **{kw: cache})
