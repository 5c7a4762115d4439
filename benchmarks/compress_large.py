"""Compress a model larger than the GPU budget: layer-by-layer calibration, sharded save, spread load.

Builds a random-weight LLaVA-NeXT model of a large shape in host memory (13B: Vicuna-13B decoder; 34B:
Yi-34B decoder, hidden 7168, 60 layers, 56 query / 8 KV heads), caps the GPU (``--gpu-cap``, through
``torch.cuda.set_per_process_memory_fraction``, so an H200 behaves like an 80 GB card), compresses it
with ``--device-map sequential`` or ``auto`` under that budget, saves it in shards when the disk has
room, and loads the checkpoint back with ``device_map="auto"`` under the same cap for a short
``generate``. Writes JSON: seconds, peak GPU memory and peak host memory per stage.

    python benchmarks/compress_large.py --shape llava-next-34b --gpu-cap 80 --output r.json
    python benchmarks/compress_large.py --shape llava-next-13b --gpu-cap 40 --device-map auto --output r.json
    python benchmarks/compress_large.py --shape tiny --samples 2 --tokens 16 --output /tmp/r.json  # CPU smoke

Calibration samples are random text tokens (the decoder is what is compressed and what does not fit;
the vision tower is not exercised). Random weights give the real shapes and amount of work, nothing
about quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from compress_speed import PrintReporter

import lowrank_kit
from lowrank_kit.bench.e2e import calibration_samples, prompt_ids
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.loading import load
from lowrank_kit.methods.stats import StageRecorder
from lowrank_kit.models.presets import preset_config
from lowrank_kit.placement import parse_placement

GIB = 2**30
# Yi-34B, the decoder of llava-hf/llava-v1.6-34b-hf.
YI_34B = dict(
    hidden_size=7168,
    intermediate_size=20480,
    num_hidden_layers=60,
    num_attention_heads=56,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=64064,
    rope_theta=5000000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip


def shape_config(shape: str):
    config = preset_config("llava-next-13b")
    text = {"llava-next-34b": YI_34B, "tiny": TINY}.get(shape)
    if text is None and shape != "llava-next-13b":
        raise SystemExit(f"unknown --shape {shape!r}; use llava-next-13b, llava-next-34b or tiny")
    for key, value in (text or {}).items():
        setattr(config.text_config, key, value)
    if shape == "tiny":
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = 64, 128, 2
        vision.num_attention_heads = 2
    return config


def build_fast(config, seed: int = 0) -> torch.nn.Module:
    """The architecture in host memory with random fp16 weights, drawn on the GPU when there is one.

    transformers' own initialisation draws every weight with the CPU's serial generator, which took over
    7 minutes for a 13B model on the GPU machine; here the model is built without initialising
    (``no_init_weights``; buffers such as the rotary tables are still computed) and each matrix is drawn
    from N(0, 0.02²) on the GPU and copied in, norms set to one and vectors to zero."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    from lowrank_kit.models.classes import model_class_for

    with no_init_weights():
        model = model_class_for(config)._from_config(config, dtype=torch.float16)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
                continue
            rows = max(1, (256 * 2**20) // (param[0].numel() * 2))  # 512 MiB of fp16 at a time
            for start in range(0, param.shape[0], rows):
                part = param[start : start + rows]
                drawn = torch.randn(part.shape, generator=gen, device=device, dtype=torch.float16)
                part.copy_(drawn.mul_(0.02))
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llava-next-34b")
    p.add_argument("--method", default="wsvd")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--params", default="{}", help="method parameters as JSON, e.g. '{\"finetune\": true}'")
    p.add_argument("--device-map", default="sequential", choices=["sequential", "auto"])
    p.add_argument("--gpu-cap", type=float, default=None, help="GiB of GPU memory this process may use")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--max-shard-size", default="10GB")
    p.add_argument(
        "--save-dir", type=Path, default=None, help="where the checkpoint goes (default: a temp dir)"
    )
    p.add_argument("--no-load", action="store_true", help="skip loading the checkpoint back")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    budget = None
    if args.gpu_cap is not None and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_cap * GIB / total))
        budget = f"{args.gpu_cap}GiB"
    # The cap itself is the per-process fraction; auto also plans its resident layers by it.
    placement = parse_placement(args.device_map, budget if args.device_map == "auto" else None)
    recorder = StageRecorder(PrintReporter(), torch.device("cuda" if cuda else "cpu"))
    result: dict[str, Any] = {
        "benchmark": "compress_large",
        "shape": args.shape,
        "method": args.method,
        "params": json.loads(args.params),
        "requested_rho1": args.ratio,
        "device_map": args.device_map,
        "gpu_cap_gib": args.gpu_cap,
        "calibration": {"samples": args.samples, "tokens": args.tokens, "kind": "random text tokens"},
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "stages": recorder.stages,
    }

    def write() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    config = shape_config(args.shape)
    with recorder.stage("build random model (host memory)"):
        model = build_fast(config)
    result["params"] = sum(t.numel() for t in model.parameters())
    result["model_bytes"] = sum(t.numel() * t.element_size() for t in model.parameters())
    samples = calibration_samples(model, args.samples, args.tokens, 0)
    recipe = lowrank_kit.recipe_from_flags(
        model=f"{args.shape}-shaped",
        method=args.method,
        ratio=args.ratio,
        params=json.loads(args.params) or None,
    )
    with recorder.stage("compress"):
        compressed = lowrank_kit.compress(
            model, recipe, calibration=samples, placement=placement, reporter=PrintReporter()
        )
    report = compressed.report
    result.update(
        rho1=report["rho1"],
        rho2=report["rho2"],
        placement=report["placement"],
        compress_stages=report["decompose"].get("stages"),
        peak_gpu_bytes_compress=report["decompose"].get("peak_gpu_memory_bytes"),
    )
    write()

    root = args.save_dir or Path(tempfile.mkdtemp(prefix="compress_large_", dir=str(Path.home())))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = report["weight_bytes"] if "weight_bytes" in report else result["model_bytes"]
    result["disk_free_bytes"], result["checkpoint_weight_bytes"] = free, need
    if free < need * 1.01 + GIB:  # the shards plus their headers, the index and the processor-less rest
        result["saved"] = (
            f"not saved: {free / GIB:.1f} GiB free on {root}, the weights need {need / GIB:.1f} GiB"
        )
        print(result["saved"], flush=True)
        write()
        return result
    with recorder.stage("save (sharded)"):
        out = save_compressed(compressed, root / "ckpt", max_shard_size=args.max_shard_size)
    result["saved"] = {
        "weight_files": report["weight_files"],
        "disk_bytes": report["disk_bytes"],
        "files": sorted(p.name for p in out.glob("*.safetensors")),
    }
    compressed = model = None  # free host memory before the load
    write()

    if not args.no_load:
        spread = parse_placement("auto", budget)
        with recorder.stage("load (device_map auto)"):
            loaded = load(out, device=spread)
        where = getattr(loaded.model, "hf_device_map", None) or {"": str(placement.execution_device)}
        result["loaded_device_map"] = {str(k): str(v) for k, v in where.items()}
        ids = prompt_ids(loaded.model, 1, 32, 1)
        with recorder.stage("generate 8 tokens"):
            tokens = loaded.model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        result["generated_tokens"] = tokens[0, -8:].tolist()
    if args.save_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    write()
    return result


if __name__ == "__main__":
    main()
