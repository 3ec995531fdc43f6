#!/usr/bin/env bash
# Issue 8 weak scaling on the 4-H200 machine: ep on 1, 2 and 4 GPUs with the same work per GPU
# (8-layer cut of Qwen3-30B-A3B, seq 4096, 4 sequences per GPU per step in micro-batches of 2, compiled
# layers). Target: tokens/s per GPU at 4 GPUs >= 90 % of the 1-GPU figure. (1 GPU on 2026-11-29:
# 72,849 tok/s; 2 GPUs: 57,850 = 79 %.)
source bench/gpu_env.sh
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --micro-batch 2 --steps 10 --set train.warmup_steps=3 --set train.save_model=false"
CUDA_VISIBLE_DEVICES=0 run weak_ep1 200 $Q --strategy ep --ep-size 1 --global-batch 8
CUDA_VISIBLE_DEVICES=0,1 run weak_ep2 200 $Q --strategy ep --ep-size 2 --nproc 2 --global-batch 16
run weak_ep4 200 $Q --strategy ep --ep-size 4 --nproc 4 --global-batch 32 --set train.profile_steps=2
cp "$RUNS/weak_ep4/profile.txt" "$OUT/profile_weak_ep4.txt" 2>/dev/null
rm -rf "$RUNS"/*/profile_trace.json
pack
