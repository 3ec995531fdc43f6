#!/usr/bin/env bash
# First GPU call (4 H200s): torch 2.11 smoke test, then issue 3/4 strategies on Qwen3-30B-A3B at seq 4096.
source bench/gpu_env.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), torch.cuda.get_device_name(0))"
nvidia-smi topo -m | head -8
Q="--config qwen3-30b-a3b --seq-len 4096 --set train.save_model=false"
run tiny_single 120 --steps 5
run fsdp_30b 200 $Q --strategy fsdp --nproc 4 --steps 6 --global-batch 8 --micro-batch 1 --set train.warmup_steps=3
run tp_30b 200 $Q --strategy tp --tp-size 4 --steps 5 --global-batch 2 --micro-batch 1 --set train.warmup_steps=2
run mixed_30b 200 $Q --strategy mixed --dp-size 2 --tp-size 2 --steps 5 --global-batch 4 --micro-batch 1 --set train.warmup_steps=2
run ddp_16l 200 $Q --set model.num_layers=16 --strategy ddp --nproc 4 --steps 6 --global-batch 8 --micro-batch 1 --set train.warmup_steps=3
run fsdp_16l 200 $Q --set model.num_layers=16 --strategy fsdp --nproc 4 --steps 6 --global-batch 8 --micro-batch 1 --set train.warmup_steps=3
pack
