#!/usr/bin/env bash
# One-H200 call: torch 2.11 smoke test, single-GPU figures and a profile on an 8-layer cut of Qwen3-30B-A3B,
# and a bf16 weight check of ep's grouped-GEMM path against single.
source bench/gpu_env.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))"
run tiny_single 120 --steps 5
run tiny_ep1 120 --steps 5 --strategy ep --ep-size 1
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --steps 8 --global-batch 8 --micro-batch 2 --set train.warmup_steps=3 --set train.profile_steps=2"
run single_8l 240 $Q --strategy single
run ep1_8l 240 $Q --strategy ep --ep-size 1
python3 -m moectl compare-weights "$RUNS/ep1_8l/model" "$RUNS/single_8l/model" --top 5 --json "$OUT/compare_ep1_single.json"
cp "$RUNS/single_8l/profile.txt" "$OUT/profile_single_8l.txt"; cp "$RUNS/ep1_8l/profile.txt" "$OUT/profile_ep1_8l.txt"
head -45 "$OUT/profile_ep1_8l.txt" | cut -c1-200
rm -rf "$RUNS"/*/model "$RUNS"/*/profile_trace.json
