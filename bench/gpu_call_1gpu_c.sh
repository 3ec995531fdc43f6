#!/usr/bin/env bash
# Third one-H200 call (2026-11-29), issue 8 levers on the 8-layer cut, all compiled, ep on one rank:
# (1) compiled loss (profile of the compiled step, 10 steps), (2) micro-batch 4, (3) activation
# checkpointing at micro-batch 2 (what the full model's memory plan would cost), (4) single for reference.
# Each against call 2's compiled ep: 67,526 tok/s, 46.3 GiB.
source bench/gpu_env.sh
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --global-batch 8 --set train.warmup_steps=3 --set train.save_model=false --set train.compile=true"
run ep1_8l_closs 240 $Q --strategy ep --ep-size 1 --micro-batch 2 --steps 10 --set train.profile_steps=2
cp "$RUNS/ep1_8l_closs/profile.txt" "$OUT/profile_ep1_8l_compiled.txt"
run ep1_8l_closs_mb4 200 $Q --strategy ep --ep-size 1 --micro-batch 4 --steps 8
run ep1_8l_closs_ac 200 $Q --strategy ep --ep-size 1 --micro-batch 2 --steps 8 --set train.activation_checkpointing=true
run single_8l_closs 200 $Q --strategy single --micro-batch 2 --steps 8
head -40 "$OUT/profile_ep1_8l_compiled.txt" | cut -c1-90,150-215
pack
