#!/usr/bin/env bash
# 2 H200s (2026-11-29), call B: the full 48-layer Qwen3-30B-A3B with ep 2 (micro-batch 2, else 1), the naive
# expert-parallel baseline against ep 2 on the 8-layer cut, tp 2 after the optimizer fix, fsdp 2 full model.
source bench/gpu_env.sh
F="--config qwen3-30b-a3b --seq-len 4096 --global-batch 8 --steps 6 --set train.warmup_steps=3 --set train.save_model=false"
run ep2_full_mb2 180 $F --strategy ep --ep-size 2 --nproc 2 --micro-batch 2
[ -f "$RUNS/ep2_full_mb2/summary.json" ] || run ep2_full_mb1 150 $F --strategy ep --ep-size 2 --nproc 2 --micro-batch 1
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --micro-batch 2 --set train.save_model=false"
run naive2_8l 100 $Q --strategy bench/naive_ep.py --ep-size 2 --nproc 2 --global-batch 8 --steps 4 --set train.warmup_steps=2 --set train.compile=false
run tp2_8l 90 $Q --strategy tp --tp-size 2 --global-batch 8 --steps 8 --set train.warmup_steps=3
run fsdp2_full 150 $F --strategy fsdp --nproc 2 --micro-batch 1 --set train.compile=false
pack
