#!/usr/bin/env bash
# One-H200 call: torch 2.11 smoke test and the single-GPU figures on a layer cut of Qwen3-30B-A3B.
source bench/gpu_env.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))"
Q="--config qwen3-30b-a3b --seq-len 4096 --set train.save_model=false --set model.num_layers=8"
run tiny_single 120 --steps 5
run single_8l 200 $Q --strategy single --steps 8 --global-batch 4 --micro-batch 2 --set train.warmup_steps=3
run fsdp1_8l 200 $Q --strategy fsdp --nproc 1 --steps 8 --global-batch 4 --micro-batch 2 --set train.warmup_steps=3
run ep1_8l 200 $Q --strategy ep --ep-size 1 --nproc 1 --steps 8 --global-batch 4 --micro-batch 2 --set train.warmup_steps=3
