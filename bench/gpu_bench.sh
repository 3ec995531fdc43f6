#!/usr/bin/env bash
# `moectl bench` on 4 H200s, Qwen3-30B-A3B at seq 4096, verified against the fsdp reference (bf16, rtol 1e-2).
# bench.json, bench.png and the console log land in $OUT (see gpu_env.sh); the 61 GB models are written
# under $BENCH_DIR and deleted once compared (--prune-models).
# single and ddp hold the whole model per GPU (bf16 weights + grads ≈ 122 GB before activations) and do
# not fit; add them with STRATEGIES=single,ddp,fsdp,tp,mixed,ep to see them fail as out of memory.
# Knobs: STRATEGIES, STEPS, WARMUP, GLOBAL_BATCH, MICRO_BATCH, EXTRA (more bench flags, e.g. a layer cut:
# EXTRA="--set model.num_layers=16"), RUN_TIMEOUT (seconds per strategy).
set -uo pipefail
source bench/gpu_env.sh
BENCH_DIR="${BENCH_DIR:-/tmp/moectl-bench-$(date +%H%M%S)}"
$MOECTL bench --config qwen3-30b-a3b --nproc 4 --seq-len 4096 \
  --strategies "${STRATEGIES:-fsdp,tp,mixed,ep}" \
  --steps "${STEPS:-6}" --warmup "${WARMUP:-3}" \
  --global-batch "${GLOBAL_BATCH:-16}" --micro-batch "${MICRO_BATCH:-1}" \
  --strategy-args "mixed:--dp-size 2 --tp-size 2;ep:--ep-size 4" \
  --verify --reference fsdp --prune-models --run-timeout "${RUN_TIMEOUT:-900}" \
  --out "$BENCH_DIR" ${EXTRA:-} 2>&1 | tee "$OUT/bench.log"
code=${PIPESTATUS[0]}
cp "$BENCH_DIR"/bench.json "$BENCH_DIR"/bench.png "$OUT"/ 2>/dev/null && echo "results: $OUT/bench.json"
echo "moectl bench exit code $code"
exit "$code"
