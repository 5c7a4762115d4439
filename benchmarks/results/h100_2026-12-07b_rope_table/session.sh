#!/usr/bin/env bash
# Archived record: this ran on the device as benchmarks/heads_table_session.sh at commit 95af175 (the
# per-head kernel with RoPE from a table, reverted afterwards because it measured slower); the files
# next to it are its output.
#
# One device call (2026-12-07, second session): the launch sweep of the per-head
# kernel at the target shape (fp16 and int8; the grouped kernel as baseline; SDPA and copy in the same
# run), then the end-to-end decode benchmark with the sweep's fastest fp16 launch for <= 128 columns
# written into the launch table first (the same row is then committed in triton.py); last the GPU
# kernel tests.
#
#   OUT=/tmp/gpu CARD=h100 bash benchmarks/heads_table_session.sh
set -uo pipefail
OUT=${OUT:?set OUT}; CARD=${CARD:-h100}
mkdir -p "$OUT"
# pydantic for the device image (see gpu_session.sh)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD LOWRANK_KIT_CACHE=/tmp/lowrank-cache
timeout 300 python3 benchmarks/attention_decode.py run --sweep --sweep-classes fp16 int8 --batches 16 \
  --lengths 8192 --rhos 0.5 --time-budget 200 --out "$OUT/attention_decode_target_$CARD.json" >"$OUT/sweep.log" 2>&1
echo "sweep rc=$?" | tee -a "$OUT/steps.txt"
grep -E "^(TARGET|check)" "$OUT/sweep.log"
python3 - "$OUT/attention_decode_target_$CARD.json" <<'PY'
import json, re, sys
res = json.load(open(sys.argv[1]))
rows = [r for r in res["sweep"] if r["kernel"] == "heads" and r["dtype"] == "fp16" and r.get("us")
        and r.get("check_ok") and r["heads_per_program"] == 2]
for r in res["sweep"]:
    print("sweep", r["dtype"], r["kernel"], r["heads_per_program"], r["block_n"], r["num_warps"],
          r["num_stages"], r.get("us"), r.get("frac_copy"), r.get("check_ok"), r.get("rel_err"), r.get("error", ""))
if rows:
    best = min(rows, key=lambda r: r["us"])
    cfg = (best["block_n"], best["num_warps"], best["num_stages"])
    p = "lowrank_kit/kernels/latent_attention/triton.py"
    s = open(p).read()
    s2 = re.sub(r"\(128, \(\d+, \d+, \d+\)\),", f"(128, {cfg}),", s, count=1)
    open(p, "w").write(s2)
    print("launch table row for <= 128 columns:", cfg)
PY
OUT=$OUT CARD=$CARD bash benchmarks/gpu_session.sh e2e
grep -n "(128, (" lowrank_kit/kernels/latent_attention/triton.py
OUT=$OUT CARD=$CARD bash benchmarks/gpu_session.sh kernel_tests
