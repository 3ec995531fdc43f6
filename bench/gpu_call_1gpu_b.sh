#!/usr/bin/env bash
# Second one-H200 call (issue 8 levers on the 8-layer cut): gather-only dispatch backward + fused SGD,
# then torch.compile of the decoder layers, each against the first call's 44,385 tok/s for ep (1 rank).
source bench/gpu_env.sh
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --steps 8 --global-batch 8 --micro-batch 2 --set train.warmup_steps=3 --set train.save_model=false"
run ep1_8l_gather 240 $Q --strategy ep --ep-size 1 --set train.profile_steps=2
cp "$RUNS/ep1_8l_gather/profile.txt" "$OUT/profile_ep1_8l_gather.txt"
run ep1_8l_mb4 240 $Q --strategy ep --ep-size 1 --micro-batch 4
run ep1_8l_compile 300 $Q --strategy ep --ep-size 1 --set train.compile=true
run single_8l_compile 300 $Q --strategy single --set train.compile=true
head -30 "$OUT/profile_ep1_8l_gather.txt" | cut -c1-72,150-200
rm -rf "$RUNS"/*/profile_trace.json
