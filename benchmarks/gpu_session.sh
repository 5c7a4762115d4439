#!/usr/bin/env bash
# One device session's GPU work, in one command (device time is scarce; see docs/benchmarks.md):
# the compiled-kernel and GPU-runtime tests, the end-to-end decode benchmark at the target shape,
# the decode-attention shape grid, and the testbed's quantization table on the GPU. Results land
# in $OUT (JSON, test logs); copy them into benchmarks/results/ and commit them.
#
#   OUT=/tmp/gpu CARD=h100 bash benchmarks/gpu_session.sh [tests kernel_tests runtime_tests seq_tests large_34b large_13b int_tests int_sweep int_linears int_linear e2e_w8 e2e_long target sweep occupancy gqa_sweep e2e profile_graph grid grid_full grid_full_llava grid_full_qwen quant]
#   (default: tests e2e grid quant; CARD names the output files)
#
# The device image has torch/triton/transformers but not pydantic: wheels for its Python carried in
# .whl/ are installed to /tmp/site first when present.
set -uo pipefail
OUT=${OUT:?set OUT to a directory for the results}
CARD=${CARD:-h100}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests e2e grid quant)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export LOWRANK_KIT_CACHE=/tmp/lowrank-cache
python3 - <<'PY' | tee "$OUT/environment.txt"
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("triton", "transformers", "pydantic", "typer", "rich", "pluggy", "datasets", "safetensors", "yaml"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
import transformers
print("CLIPImageProcessor", hasattr(transformers, "CLIPImageProcessor"),
      "CLIPImageProcessorPil", hasattr(transformers, "CLIPImageProcessorPil"))
PY
status=0
step() {  # step NAME SECONDS CMD...: run with a wall-clock limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -5 "$OUT/$name.log"
  [ $rc -ne 0 ] && status=1
  return 0
}
grid_full_model() {  # grid_full_model MODEL LIMIT BUDGET: the full grid of one attention shape
  step "attention_grid_full_$1" "$2" python3 benchmarks/attention_decode.py run --grid full --models "$1" \
    --time-budget "$3" --rhos 0.5 0.7 0.9 --skip-index-order --out "$OUT/attention_decode_grid_full_${1}_$CARD.json"
}
for p in "${parts[@]}"; do
  case $p in
    tests)
      step gpu_tests 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_latent_attention_gpu.py \
        tests/runtime/test_generate_gpu.py tests/data/test_synthetic.py ;;
    kernel_tests)
      step kernel_tests 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_latent_attention_gpu.py ;;
    runtime_tests)
      step runtime_tests 240 python3 -m pytest -q -p no:cacheprovider -rfEs tests/runtime/test_generate_gpu.py ;;
    int_tests)  # integer linears: compiled Triton kernel and _int_mm against the naive twin; a W8A8 model on GPU
      step int_tests 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/kernels/test_int_linear_gpu.py \
        tests/kernels/test_int_linear.py tests/checkpoint/test_int_memory.py ;;
    seq_tests)  # layer-by-layer compression streaming real layers to the GPU
      step seq_tests 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/checkpoint/test_sequential_gpu.py \
        tests/checkpoint/test_sequential.py ;;
    large_34b)  # a LLaVA-NeXT-34B-shaped model compressed under an 80 GiB cap, layer by layer
      step compress_large_34b "${LARGE_LIMIT:-590}" python3 benchmarks/compress_large.py --shape llava-next-34b \
        --gpu-cap 80 --samples "${LARGE_SAMPLES:-16}" --params '{"finetune": true}' \
        --output "$OUT/compress_large_llava-next-34b_wsvd_$CARD.json" ;;
    large_13b)  # a LLaVA-NeXT-13B-shaped model under a 40 GiB cap, as many layers resident as fit
      step compress_large_13b 420 python3 benchmarks/compress_large.py --shape llava-next-13b --gpu-cap 40 \
        --device-map auto --params '{"finetune": true}' --output "$OUT/compress_large_llava-next-13b_wsvd_$CARD.json" ;;
    int_sweep)  # launch shapes of the Triton integer kernel at 8 rows (unswapped and swapped operands)
      step int_sweep 420 python3 benchmarks/int_linear.py --parts sweep --iters 30 --output "$OUT/int_linear_sweep_$CARD.json" ;;
    int_linears)  # backends per layer shape and row count only (no memory part)
      step int_linears 200 python3 benchmarks/int_linear.py --parts linears --output "$OUT/int_linear_linears_$CARD.json" ;;
    int_linear)  # backends per layer shape and row count; memory of a W8 LLaVA-NeXT-7B loaded on the GPU
      step int_linear 420 python3 benchmarks/int_linear.py --output "$OUT/int_linear_$CARD.json" ;;
    e2e_w8)  # the target shape with int8 weights (computed from their integers) and int8 latents
      step decode_e2e_w8 480 python3 benchmarks/decode_e2e.py --quant w8a16-kv8 \
        --output "$OUT/decode_e2e_llava-next-7b_w8kv8_$CARD.json" ;;
    e2e_long)  # batch 1 at 32K context, fp16 and W8 + kv8
      step decode_e2e_long 400 python3 benchmarks/decode_e2e.py --batch 1 --context 32768 \
        --output "$OUT/decode_e2e_llava-next-7b_b1_32k_$CARD.json"
      step decode_e2e_long_w8 450 python3 benchmarks/decode_e2e.py --batch 1 --context 32768 --quant w8a16-kv8 \
        --output "$OUT/decode_e2e_llava-next-7b_b1_32k_w8kv8_$CARD.json" ;;
    target)
      step attention_target 240 python3 benchmarks/attention_decode.py run --batches 16 --lengths 8192 \
        --rhos 0.5 --time-budget 200 --out "$OUT/attention_decode_target_$CARD.json" ;;
    sweep)
      step attention_sweep 400 python3 benchmarks/attention_decode.py run --sweep --batches 16 --lengths 8192 \
        --rhos 0.5 --time-budget 360 --out "$OUT/attention_decode_target_$CARD.json" ;;
    occupancy)  # register caps and split lengths of the per-head kernel at the target shape (fp16, int8)
      step attention_occupancy 330 python3 benchmarks/attention_decode.py run --sweep \
        --sweep-classes occupancy occupancy_int8 --models llava-next-7b --batches 16 --lengths 8192 \
        --rhos 0.5 --time-budget 300 --out "$OUT/attention_decode_occupancy_$CARD.json" ;;
    gqa_sweep)  # launch configurations of the grouped kernel on Qwen2-VL's GQA shape (batch 64, 8192 tokens)
      step attention_gqa_sweep 300 python3 benchmarks/attention_decode.py run --sweep --sweep-classes grouped_gqa \
        --models qwen2-vl-7b --batches 64 16 --lengths 8192 --rhos 0.5 --time-budget 260 \
        --out "$OUT/attention_decode_gqa_sweep_$CARD.json" ;;
    e2e)
      step decode_e2e 390 python3 benchmarks/decode_e2e.py --output "$OUT/decode_e2e_llava-next-7b_$CARD.json" ;;
    profile_graph)
      step profile_graph 240 python3 benchmarks/profile_decode_step.py --graph \
        --output "$OUT/profile_decode_step_graph_$CARD.json" ;;
    grid)
      step attention_grid 330 python3 benchmarks/attention_decode.py run --grid cross --time-budget 280 --rhos 0.5 0.9 \
        --out "$OUT/attention_decode_grid_$CARD.json" ;;
    grid_full)  # the issue's whole grid: every batch x length at rho2 0.9 / 0.7 / 0.5, one model per command
      grid_full_model llava-next-7b 590 520
      grid_full_model qwen2-vl-7b 590 520 ;;
    grid_full_llava)  # one model of grid_full (each takes most of a 10-minute device command)
      grid_full_model llava-next-7b 560 "${GRID_BUDGET:-500}" ;;
    grid_full_qwen)
      grid_full_model qwen2-vl-7b 560 "${GRID_BUDGET:-500}" ;;
    quant)
      step quant_accuracy 420 python3 benchmarks/quant_accuracy.py --model testbed --data testbed --device cuda \
        --output "$OUT/quant_accuracy_testbed_$CARD.json" --table "$OUT/quant_accuracy_table.md" ;;
    *) echo "unknown part '$p' (tests, kernel_tests, runtime_tests, seq_tests, large_34b, large_13b, int_tests, int_sweep, int_linears, int_linear, e2e_w8, e2e_long, target, sweep, occupancy, gqa_sweep, e2e, profile_graph, grid, grid_full, grid_full_llava, grid_full_qwen, quant)"; exit 2 ;;
  esac
done
exit $status
