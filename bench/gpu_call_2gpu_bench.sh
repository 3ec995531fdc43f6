#!/usr/bin/env bash
# 2 H200s: `moectl bench` over every strategy on a 4-layer cut of Qwen3-30B-A3B (seq 4096, global batch 8,
# micro-batch 2, compiled), verified against single on one GPU (bf16, rtol 1e-2); then a profile of ep 2
# on the 8-layer cut (4 sequences per GPU per step, 2 profiled steps after warm-up).
set -uo pipefail
source bench/gpu_env.sh
$MOECTL bench --config qwen3-30b-a3b --set model.num_layers=4 --nproc 2 --seq-len 4096 \
  --strategies single,ddp,fsdp,tp,mixed,ep --strategy-args "tp:--tp-size 2;ep:--ep-size 2" \
  --steps 7 --warmup 3 --global-batch 8 --micro-batch 2 --set train.compile=true \
  --verify --reference single --prune-models --run-timeout 150 --out "$RUNS/bench2" 2>&1 | tee "$OUT/bench2.log" | tail -25
echo "moectl bench exit code ${PIPESTATUS[0]}"
cp "$RUNS"/bench2/bench.json "$RUNS"/bench2/bench.png "$OUT"/ 2>/dev/null
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --micro-batch 2 --global-batch 16 --steps 7 --set train.warmup_steps=3 --set train.save_model=false"
run ep2_8l_prof 150 $Q --strategy ep --ep-size 2 --nproc 2 --set train.profile_steps=2
cp "$RUNS/ep2_8l_prof/profile.txt" "$OUT/profile_ep2_8l.txt" 2>/dev/null
head -40 "$OUT/profile_ep2_8l.txt" | cut -c1-80,150-215
rm -rf "$RUNS"/*/profile_trace.json
pack
