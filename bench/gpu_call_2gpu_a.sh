#!/usr/bin/env bash
# 2 H200s (2026-11-29), call A: NCCL smoke tests on the tiny preset, then the 8-layer cut of Qwen3-30B-A3B
# (seq 4096, micro-batch 2, compiled layers, 4 sequences per GPU per step = the one-GPU runs' per-GPU batch):
# ep 2 (weak-scaling point against ep on 1 GPU), fsdp 2 (both saved, bf16 weights compared), ddp 2, tp 2.
source bench/gpu_env.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count())"
nvidia-smi topo -m | head -4
run tiny_ep2 90 --strategy ep --ep-size 2 --nproc 2 --steps 4 --set train.save_model=false
run tiny_fsdp2 90 --strategy fsdp --nproc 2 --steps 4 --set train.save_model=false
run tiny_tp2 90 --strategy tp --tp-size 2 --steps 4 --set train.save_model=false
Q="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8 --micro-batch 2 --steps 8 --set train.warmup_steps=3"
run ep2_8l 200 $Q --strategy ep --ep-size 2 --nproc 2 --global-batch 16
run fsdp2_8l 200 $Q --strategy fsdp --nproc 2 --global-batch 16
python3 -m moectl compare-weights "$RUNS/ep2_8l/model" "$RUNS/fsdp2_8l/model" --top 5 --json "$RUNS/compare_ep2_fsdp2_8l.json" | tail -12
rm -rf "$RUNS"/*/model
run ddp2_8l 150 $Q --strategy ddp --nproc 2 --global-batch 16 --set train.save_model=false
run tp2_8l 150 $Q --strategy tp --tp-size 2 --global-batch 8 --set train.save_model=false
pack
