#!/usr/bin/env bash
# The commands of this session's device runs (one H100 80GB HBM3, torch 2.11, Triton 3.6, transformers 5.17),
# in order; each was one `run` of the device tool with .whl carried (see benchmarks/gpu_session.sh).
# The occupancy run was started with CARD=gpu (the card was not known in advance); its JSON was renamed
# attention_decode_occupancy_h100.json here, and its "device" field records the H100.
OUT=$OUT CARD=gpu bash benchmarks/gpu_session.sh occupancy
OUT=$OUT CARD=h100 GRID_BUDGET=480 bash benchmarks/gpu_session.sh grid_full_qwen
OUT=$OUT CARD=h100 GRID_BUDGET=480 bash benchmarks/gpu_session.sh grid_full_llava
OUT=$OUT CARD=h100 bash benchmarks/gpu_session.sh kernel_tests e2e
OUT=$OUT CARD=h100 bash benchmarks/gpu_session.sh gqa_sweep
