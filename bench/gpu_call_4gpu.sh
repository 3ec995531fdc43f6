#!/usr/bin/env bash
# 4 H200s, full Qwen3-30B-A3B (48 layers, bf16, seq 4096, real routing): issue 5 and 8 figures.
# ep 4 (compiled layers, micro-batch 2: about 91 GiB per GPU by the fitted estimate; the one-GPU proxy of
# its per-GPU work peaked at 92.0 GiB) and fsdp 4 (eager, micro-batch 1: ~77 GiB) on the same data
# (global batch 16), both saved and compared (bf16, rtol 1e-2); then the naive expert-parallel
# baseline (bench/naive_ep.py) on the same model and data for the >= 10x comparison.
source bench/gpu_env.sh
nvidia-smi topo -m | head -6
Q="--config qwen3-30b-a3b --seq-len 4096 --global-batch 16"
run ep4 330 $Q --strategy ep --ep-size 4 --micro-batch 2 --steps 9 --set train.warmup_steps=3 --set train.profile_steps=2
cp "$RUNS/ep4/profile.txt" "$OUT/profile_ep4.txt" 2>/dev/null
run fsdp4 330 $Q --strategy fsdp --nproc 4 --micro-batch 1 --steps 9 --set train.warmup_steps=3 --set train.compile=false
python3 -m moectl compare-weights "$RUNS/ep4/model" "$RUNS/fsdp4/model" --top 5 --json "$RUNS/compare_ep4_fsdp4.json"
rm -rf "$RUNS"/*/model
run naive4 300 $Q --strategy bench/naive_ep.py --ep-size 4 --nproc 4 --micro-batch 1 --steps 3 --set train.warmup_steps=1 --set train.save_model=false --set train.compile=false
rm -rf "$RUNS"/*/profile_trace.json
pack
