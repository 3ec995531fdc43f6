#!/usr/bin/env bash
# One H200 (2026-11-29): a per-GPU proxy of ep 4 on the full 48-layer Qwen3-30B-A3B, without the all-to-all.
# Under ep 4 each GPU holds 32 of the 128 experts of every layer and, with balanced routing, its experts
# receive T·8 rows for its T tokens (T/4 per expert). A 48-layer model with 32 experts and top-8 has the
# same parameters per GPU, the same active flops per token and the same grouped-GEMM shapes; the
# difference is the all-to-all (two per layer, forward and backward) and its buffers.
source bench/gpu_env.sh
P="--config qwen3-30b-a3b --seq-len 4096 --set model.num_experts=32 --global-batch 8 --steps 7 --set train.warmup_steps=3 --set train.save_model=false --set train.compile=true --strategy ep --ep-size 1"
if [ "${PROFILE:-0}" = 0 ]; then
  run proxy48_mb1 240 $P --micro-batch 1
  run proxy48_mb2 240 $P --micro-batch 2
  pack
fi
# Second call: the same proxy at micro-batch 2 under torch.profiler (2 steps after warm-up).
if [ "${PROFILE:-0}" = 1 ]; then
  run proxy48_mb2_prof 240 $P --micro-batch 2 --set train.profile_steps=2
  cp "$RUNS/proxy48_mb2_prof/profile.txt" "$OUT/profile_proxy48_mb2.txt"
  head -45 "$OUT/profile_proxy48_mb2.txt" | cut -c1-90,150-215
  pack
fi
