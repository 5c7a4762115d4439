"""Layer-by-layer compression (--device-map sequential / auto) writes the checkpoint the in-memory path
writes, for every family and every calibrated method; sharded checkpoints round-trip; placement options
fail in one line."""

import json

import pytest
import torch
from ckpt_helpers import FAMILIES, fails, greedy, samples_for
from safetensors.torch import load_file

import lowrank_kit
from lowrank_kit.checkpoint import WEIGHTS, WEIGHTS_INDEX, save_compressed, weight_files
from lowrank_kit.models.tiny import build_tiny_model, save_tiny_checkpoint, tiny_inputs
from lowrank_kit.placement import PlacementError, parse_memory, parse_placement


def compress_with(family, method, device_map=None, quant=None):
    model = build_tiny_model(family, seed=0)
    params = {"finetune": True} if method == "wsvd-ft" else None
    method = "wsvd" if method == "wsvd-ft" else method
    recipe = lowrank_kit.recipe_from_flags(model=family, method=method, ratio=0.6, quant=quant, params=params)
    # The in-memory reference runs on the CPU, so the layers do too (on a GPU machine as well).
    placement = parse_placement(device_map, execution_device="cpu") if device_map else None
    return lowrank_kit.compress(model, recipe, calibration=samples_for(model, n=3), placement=placement)


def tensors(directory):
    out = {}
    for file in weight_files(directory):
        out.update(load_file(str(file)))
    return out


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wsvd", "wsvd-ft", "svdllm", "qsvd", "asvd"])
def test_layer_by_layer_compression_writes_the_in_memory_checkpoint(family, method, tmp_path):
    # wsvd: Gram + the gradient pass (importance); wsvd-ft: also the Fisher and fine-tuning; qsvd:
    # abs-mean + importance; asvd: abs-mean; svdllm: Gram. On the CPU, sequential streams every layer and auto keeps all resident.
    reference = compress_with(family, method)
    save_compressed(reference, tmp_path / "memory")
    want = tensors(tmp_path / "memory")
    for device_map in ("sequential", "auto"):
        result = compress_with(family, method, device_map)
        stages = [s["stage"] for s in result.report["stages"]]
        assert result.report["placement"]["device_map"] == device_map
        assert result.report["placement"]["layers"] == len(result.adapter.decoder_layers(result.model))
        if method in ("wsvd", "wsvd-ft", "qsvd"):  # the streamed gradient pass ran, not the whole-model one
            decompose = result.report["decompose"]
            assert any(s["stage"] == "calibration: gradients (forward)" for s in decompose["stages"]), stages
        save_compressed(result, tmp_path / device_map)
        assert_same_tensors(tensors(tmp_path / device_map), want)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3"])
def test_layer_by_layer_quantization_writes_the_in_memory_checkpoint(family, tmp_path):
    # w8a8-kv8-qat after wsvd: Hadamard folding, then QAT's own Fisher pass on the compressed model, streamed.
    reference = compress_with(family, "wsvd", quant="w8a8-kv8-qat")
    assert "qat" in reference.report["quantize"]["methods"]
    save_compressed(reference, tmp_path / "memory")
    result = compress_with(family, "wsvd", "sequential", quant="w8a8-kv8-qat")
    save_compressed(result, tmp_path / "sequential")
    assert_same_tensors(tensors(tmp_path / "sequential"), tensors(tmp_path / "memory"))


def test_streamed_statistics_read_each_layers_own_arguments():
    # Qwen2 with sliding-window layers: each layer gets its own mask, which capturing layer 0's would miss.
    import transformers

    from lowrank_kit.methods.stats import StageRecorder, collect_input_stats
    from lowrank_kit.models.tiny import tiny_config
    from lowrank_kit.pipeline import DecomposeJob
    from lowrank_kit.progress import NULL_REPORTER
    from lowrank_kit.registry import adapter_for_config
    from lowrank_kit.sequential import LayerRunner

    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window = True, 4
    config.num_hidden_layers = 3  # layer 2's input shows whether layer 1 got the full mask
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM._from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for_config(model.config)
    samples = samples_for(model, n=2)

    def job(runner=None):
        return DecomposeJob(
            model=model,
            adapter=adapter,
            info=adapter.info(model),
            targets=("q_proj", "k_proj", "v_proj"),
            ratios={},
            calibration=samples,
            runner=runner,
        )

    recorder = StageRecorder(NULL_REPORTER, torch.device("cpu"))
    memory = collect_input_stats(job(), recorder)
    runner = LayerRunner(model, adapter, torch.device("cpu"))
    captured = runner.capture(samples, torch.float32)
    masks = [captured[0].layer_args[i][1].get("attention_mask") for i in range(3)]
    assert masks[0] is not None and masks[1] is None  # sliding window; full causal (SDPA's is_causal)
    streamed = collect_input_stats(job(runner), recorder)
    assert sorted(memory.gram) == [0, 1, 2]
    for layer in memory.gram:
        assert torch.equal(memory.gram[layer], streamed.gram[layer])


def test_capture_leaves_the_layers_as_they_were():
    from lowrank_kit.registry import adapter_for_config
    from lowrank_kit.sequential import LayerRunner

    model = build_tiny_model("llava", seed=0)
    adapter = adapter_for_config(model.config)
    runner = LayerRunner(model, adapter, torch.device("cpu"))
    inputs = tiny_inputs(model, seed=1)
    before = greedy(model, inputs)
    runner.capture(samples_for(model, n=1), torch.float32)
    assert all("forward" not in layer.__dict__ for layer in adapter.decoder_layers(model))
    assert torch.equal(greedy(model, inputs), before)


def test_sharded_checkpoint_round_trips(tmp_path):
    result = compress_with("llava", "svdllm")
    inputs = tiny_inputs(result.model, seed=3)
    want = greedy(result.model, inputs)
    total = sum(t.numel() * t.element_size() for t in result.model.state_dict().values())
    out = save_compressed(result, tmp_path / "sharded", max_shard_size=total // 3)
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (out / WEIGHTS).exists()
    assert all(f"-of-{len(files):05d}.safetensors" in f for f in files)
    assert result.report["weight_files"] == len(files)
    assert result.report["disk_bytes"] == sum((out / f).stat().st_size for f in files)
    manifest = json.loads((out / "lowrank_manifest.json").read_text())
    assert set(files) | {WEIGHTS_INDEX} <= set(manifest)
    loaded = lowrank_kit.load(out)
    assert torch.equal(greedy(loaded.model, inputs), want)
    # The same tensors as the one-file checkpoint.
    single = save_compressed(result, tmp_path / "single")
    assert_same_tensors(tensors(out), tensors(single))


def test_a_corrupt_shard_is_named(tmp_path):
    result = compress_with("llama", "svd")
    out = save_compressed(result, tmp_path / "sharded", max_shard_size=50_000)
    shard = weight_files(out)[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(lowrank_kit.LowRankError, match=shard.name):
        lowrank_kit.load(out)


def test_load_with_device_map_auto_offloads_to_disk(tmp_path, monkeypatch):
    # No GPU here: a host-memory budget too small for the model sends layers to the offload directory
    # through accelerate, and the model still generates the in-memory tokens.
    result = compress_with("llama", "svdllm")
    out = save_compressed(result, tmp_path / "ckpt")
    inputs = tiny_inputs(result.model, seed=4)
    want = greedy(result.model, inputs)
    import lowrank_kit.loading as loading

    placement = parse_placement("auto", offload_dir=tmp_path / "offload")
    kwargs = loading.from_pretrained_kwargs(placement)
    assert kwargs == {"device_map": "auto", "offload_folder": str(tmp_path / "offload")}
    weights = sum(t.numel() * t.element_size() for t in result.model.state_dict().values())
    monkeypatch.setattr(
        loading, "from_pretrained_kwargs", lambda p: {**kwargs, "max_memory": {"cpu": weights // 3}}
    )
    loaded = loading.load(out, device=placement)
    assert "disk" in loaded.model.hf_device_map.values()
    # (safetensors weights are read from the checkpoint's own files; the folder takes other formats)
    assert torch.equal(greedy(loaded.model, inputs), want)


@pytest.mark.parametrize(
    "args,message",
    [
        ({"device_map": "gpu"}, "unknown device map 'gpu'; valid: auto, sequential, cpu, cuda, cuda:N"),
        ({"device_map": "cpu", "max_gpu_memory": "4GiB"}, "--max-gpu-memory decides how many layers stay"),
        ({"device_map": "sequential", "max_gpu_memory": "4GiB"}, "it does nothing with 'sequential'"),
        ({"device_map": "auto", "max_gpu_memory": "lots"}, "'lots' is not a size"),
        ({"device_map": "auto", "max_gpu_memory": "0GB"}, "must be positive"),
        ({"device_map": "sequential", "offload_dir": "x"}, "--offload-dir holds the layers"),
        ({"device_map": "cpu", "execution_device": "cpu"}, "goes with --device-map auto or sequential"),
        (
            {"device_map": "auto", "execution_device": "tpu"},
            "layers run on one device: cpu, cuda, cuda:N or mps",
        ),
        ({"device_map": "sequential", "execution_device": "auto"}, "not 'auto'"),
        ({"device_map": "sequential", "execution_device": "meta"}, "not 'meta'"),
    ],
)
def test_bad_placements_fail_in_one_line(args, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse_placement(**args)


def test_memory_sizes():
    assert parse_memory("40GiB") == 40 * 2**30
    assert parse_memory("50GB") == 50 * 10**9
    assert parse_memory("1.5 MiB") == int(1.5 * 2**20)
    assert parse_memory(123) == 123


def test_cli_sequential_compress_writes_the_same_checkpoint(tmp_path):
    src = save_tiny_checkpoint("llava", tmp_path / "tiny")
    common = ["compress", "--model", src, "--method", "svd", "--ratio", "0.6", "--json"]
    from ckpt_helpers import runner

    from lowrank_kit.cli.main import app

    seq = ["--device", "cpu", "--device-map", "sequential", "--max-shard-size", "40kB"]
    for name, extra in (("cpu", ["--device", "cpu"]), ("seq", seq)):
        res = runner.invoke(app, [str(a) for a in [*common, "--output", tmp_path / name, *extra]])
        assert res.exit_code == 0, res.output
    assert len(weight_files(tmp_path / "seq")) > 1
    assert_same_tensors(tensors(tmp_path / "seq"), tensors(tmp_path / "cpu"))
    report = json.loads((tmp_path / "seq" / "lowrank_report.json").read_text())
    assert report["placement"]["device_map"] == "sequential"


def test_cli_placement_errors(tmp_path):
    src = save_tiny_checkpoint("llama", tmp_path / "tiny")
    base = ["compress", "--model", src, "--method", "svd", "--ratio", "0.6", "--output", tmp_path / "o"]
    assert "contradict" in fails(*base, "--device", "cpu", "--device-map", "cuda")
    assert "unknown device map" in fails(*base, "--device-map", "everywhere")
    assert "--max-shard-size" in fails(*base, "--max-shard-size", "big")
    assert "--eval-data scores the model in memory" in fails(
        *base, "--device-map", "sequential", "--eval-data", "text:pydoc"
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(PlacementError, match="compression one decoder layer at a time"):
        lowrank_kit.load(tmp_path / "tiny", device=parse_placement("sequential"))


def test_keyword_api_and_what_compress_refuses(tmp_path):
    model = build_tiny_model("llama", seed=0)
    recipe = lowrank_kit.recipe_from_flags(model="llama", method="svdllm", ratio=0.6)
    result = lowrank_kit.compress(
        model, recipe, calibration=samples_for(model, n=3), device="cpu", device_map="sequential"
    )
    assert result.report["placement"]["device_map"] == "sequential"
    assert result.report["placement"]["execution_device"] == "cpu"
    out = save_compressed(result, tmp_path / "ckpt")
    loaded = lowrank_kit.load(out, device_map="auto")
    inputs = tiny_inputs(result.model, seed=5)
    assert torch.equal(greedy(loaded.model, inputs), greedy(result.model, inputs))
    with pytest.raises(PlacementError, match="go with --device-map auto"):
        lowrank_kit.load(out, max_gpu_memory="1GiB")

    fresh = build_tiny_model("llama", seed=0)
    with pytest.raises(lowrank_kit.LowRankError, match="an offload directory applies to loading"):
        lowrank_kit.compress(fresh, recipe, placement=parse_placement("auto", offload_dir=tmp_path / "off"))
    on_meta = build_tiny_model("llama", seed=0)
    on_meta.model.layers[1].mlp.to("meta")
    with pytest.raises(lowrank_kit.LowRankError, match="weights on the meta device"):
        lowrank_kit.compress(on_meta, recipe, calibration=samples_for(fresh, n=1))


def test_residency_fills_the_execution_device_then_the_other_gpus():
    from lowrank_kit.sequential import plan_residency

    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert plan_residency([10] * 5, [(gpu0, 25), (gpu1, 20)]) == [gpu0, gpu0, gpu1, gpu1, None]
    assert plan_residency([10] * 3, [(gpu0, -5)]) == [None, None, None]  # no room after the reserve
    assert plan_residency([10] * 3, [(gpu0, 100)]) == [gpu0] * 3
    assert plan_residency([10, 30, 10], [(gpu0, 15), (gpu1, 35)]) == [gpu0, gpu1, None]


def test_layers_resident_on_another_device_get_their_inputs_moved(monkeypatch):
    # "cpu:0" is a device other than "cpu" to the runner but the same memory, so the moves to a resident
    # layer's device can be recorded on the CPU; the result equals the plain stream's.
    from lowrank_kit import sequential
    from lowrank_kit.methods.stats import stream_forward
    from lowrank_kit.registry import adapter_for_config

    model = build_tiny_model("llava", seed=0)
    adapter = adapter_for_config(model.config)
    cpu, other = torch.device("cpu"), torch.device("cpu", 0)
    plain = sequential.LayerRunner(model, adapter, cpu)
    resident = sequential.LayerRunner(model, adapter, cpu, [other, None])
    assert resident.resident_layers == 1 and resident.layer_device(0) == other
    moved = []
    real = sequential._to
    monkeypatch.setattr(sequential, "_to", lambda value, device: moved.append(device) or real(value, device))
    captured = plain.capture(samples_for(model, n=2), torch.float32)
    with torch.no_grad():
        want, _ = stream_forward(plain, captured)
        assert moved == []
        got, _ = stream_forward(resident, captured)
    assert moved and set(moved) == {other}  # layer 0's arguments (nested values too), never layer 1's
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_a_failed_streamed_step_leaves_the_model_in_host_memory(monkeypatch):
    from lowrank_kit.methods import stats

    model = build_tiny_model("llama", seed=0)
    recipe = lowrank_kit.recipe_from_flags(model="llama", method="wsvd", ratio=0.6)
    moved = []
    real = lowrank_kit.sequential.LayerRunner.release

    def release(self):
        moved.append("released")
        real(self)

    def broken(*args, **kwargs):
        raise lowrank_kit.LowRankError("the gradient pass broke")

    monkeypatch.setattr(lowrank_kit.sequential.LayerRunner, "release", release)
    monkeypatch.setattr(stats, "_stream_gradients", broken)
    with pytest.raises(lowrank_kit.LowRankError, match="the gradient pass broke"):
        lowrank_kit.compress(
            model, recipe, calibration=samples_for(model), device="cpu", device_map="sequential"
        )
    assert moved == ["released"]


def test_the_streamed_gradient_pass_refuses_what_host_memory_cannot_hold(monkeypatch):
    from lowrank_kit.methods import stats

    monkeypatch.setattr(stats, "_available_host_bytes", lambda: 1000)
    model = build_tiny_model("llama", seed=0)
    recipe = lowrank_kit.recipe_from_flags(model="llama", method="wsvd", ratio=0.6)
    with pytest.raises(
        lowrank_kit.LowRankError, match="keeps each layer's input: .* GiB of host memory for 2"
    ):
        lowrank_kit.compress(
            model, recipe, calibration=samples_for(model), device="cpu", device_map="sequential"
        )
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_empty_tensors_are_not_taken_for_one_shared_tensor(tmp_path):
    from lowrank_kit.checkpoint import _unique_tensors

    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.empty(0))
    model.b = torch.nn.Parameter(torch.empty(0))
    model.c = torch.nn.Linear(2, 2)
    model.d = model.c  # tied: one tensor under two names
    assert sorted(_unique_tensors(model)) == ["a", "b", "c.bias", "c.weight"]


def test_device_names_are_compared_as_devices():
    from lowrank_kit.placement import resolve_placement

    assert resolve_placement("cpu", "cpu").device_map == "cpu"
    with pytest.raises(PlacementError, match="contradict"):
        resolve_placement("cpu", "cuda")


def test_spreading_a_load_without_accelerate_is_one_line(monkeypatch):
    import importlib.util

    from lowrank_kit.placement import from_pretrained_kwargs

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a)
    )
    with pytest.raises(PlacementError, match="pip install accelerate"):
        from_pretrained_kwargs(parse_placement("auto"))
