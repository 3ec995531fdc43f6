#!/usr/bin/env bash
# `moectl bench` on one H200 (2026-11-29): every strategy on a 4-layer cut of Qwen3-30B-A3B at seq 4096,
# verified against single (bf16, rtol 1e-2). With one process ddp and fsdp train the unwrapped model and
# tp / mixed are refused (they need 2+ processes): the table shows how bench reports both.
set -uo pipefail
source bench/gpu_env.sh
$MOECTL bench --config qwen3-30b-a3b --set model.num_layers=4 --nproc 1 --seq-len 4096 \
  --strategies single,ddp,fsdp,tp,mixed,ep --steps 7 --warmup 3 --global-batch 8 --micro-batch 2 \
  --set train.compile=true --verify --reference single --prune-models --run-timeout 240 \
  --out "$RUNS/bench1" 2>&1 | tee "$OUT/bench1.log"
echo "moectl bench exit code ${PIPESTATUS[0]}"
cp "$RUNS"/bench1/bench.json "$RUNS"/bench1/bench.png "$OUT"/ 2>/dev/null
pack
