#!/usr/bin/env bash
# 2 H200s: the whole Qwen3-30B-A3B (48 layers, bf16, seq 4096, global batch 8, SGD) under ep 2 (compiled,
# micro-batch 2: 118 GiB by the estimate; else 1) and fsdp 2 (compiled, micro-batch 1), both saved and
# compared (bf16, rtol 1e-2); then the naive expert-parallel baseline against ep 2 eager, micro-batch 1.
source bench/gpu_env.sh
df -h /tmp | tail -1; nvidia-smi topo -m | head -3
F="--config qwen3-30b-a3b --seq-len 4096 --global-batch 8 --steps 6 --set train.warmup_steps=3"
run ep2_full_mb2 200 $F --strategy ep --ep-size 2 --nproc 2 --micro-batch 2
[ -f "$RUNS/ep2_full_mb2/summary.json" ] || run ep2_full_mb1 170 $F --strategy ep --ep-size 2 --nproc 2 --micro-batch 1
run fsdp2_full 200 $F --strategy fsdp --nproc 2 --micro-batch 1
EP=$(ls -d "$RUNS"/ep2_full_mb*/model | head -1)
$MOECTL compare-weights "$EP" "$RUNS/fsdp2_full/model" --top 5 --json "$RUNS/compare_ep2_fsdp2_full.json" | tail -9
rm -rf "$RUNS"/*/model
E="--config qwen3-30b-a3b --seq-len 4096 --global-batch 8 --steps 4 --set train.warmup_steps=2 --micro-batch 1 --set train.compile=false --set train.save_model=false"
run naive2_full 150 $E --strategy bench/naive_ep.py --ep-size 2 --nproc 2
run ep2_full_eager 100 $E --strategy ep --ep-size 2 --nproc 2
pack
