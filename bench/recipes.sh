# The GPU benchmark recipes behind BENCHMARKS.md, one shell function each (run by bench/run.sh, which
# defines run, compare, profile, bench and pack). Qwen3-30B-A3B at seq 4096, bf16, SGD, synthetic data
# unless a recipe says otherwise.

CUT8="--config qwen3-30b-a3b --seq-len 4096 --set model.num_layers=8"
FULL="--config qwen3-30b-a3b --seq-len 4096"

recipe_one_gpu_8l() {  # single vs ep on one H200, 8-layer cut, eager; profiles; bf16 weight check
  local q="$CUT8 --steps 8 --global-batch 8 --micro-batch 2 --set train.timing_warmup_steps=3 --set train.profile_steps=2"
  run single_8l 240 $q --strategy single
  run ep1_8l 240 $q --strategy ep --ep-size 1
  compare ep1_8l single_8l; profile single_8l; profile ep1_8l
}

recipe_one_gpu_compiled() {  # the compiled 8-layer cut: ep at micro-batch 2 and 4, with checkpointing, single
  local q="$CUT8 --global-batch 8 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  run ep1_8l_compiled 240 $q --strategy ep --ep-size 1 --micro-batch 2 --steps 10 --set train.profile_steps=2
  profile ep1_8l_compiled
  run ep1_8l_compiled_mb4 200 $q --strategy ep --ep-size 1 --micro-batch 4 --steps 8
  run ep1_8l_compiled_ac 200 $q --strategy ep --ep-size 1 --micro-batch 2 --steps 8 --set train.activation_checkpointing=true
  run single_8l_compiled 200 $q --strategy single --micro-batch 2 --steps 8
}

recipe_one_gpu_proxy() {  # per-GPU proxy of ep 4 on the whole model: 48 layers, 32 experts, one GPU
  local p="$FULL --set model.num_experts=32 --global-batch 8 --steps 7 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true --strategy ep --ep-size 1"
  run proxy48_mb1 240 $p --micro-batch 1
  run proxy48_mb2 240 $p --micro-batch 2 --set train.profile_steps=2
  profile proxy48_mb2
}

recipe_one_gpu_bench() {  # moectl bench on one H200, 4-layer cut, verified against single
  bench bench1 $FULL --set model.num_layers=4 --nproc 1 --strategies single,ddp,fsdp,tp,mixed,ep \
    --steps 7 --warmup 3 --global-batch 8 --micro-batch 2 --set train.compile=true \
    --verify --reference single --prune-models --run-timeout 240
}

recipe_two_gpu_8l() {  # 8-layer cut on two H200s, 8 sequences per GPU per step: ep 2, fsdp 2, ddp 2, tp 2
  local q="$CUT8 --micro-batch 2 --steps 8 --set train.timing_warmup_steps=3 --set train.compile=true"
  run ep2_8l 200 $q --strategy ep --ep-size 2 --nproc 2 --global-batch 16
  run fsdp2_8l 200 $q --strategy fsdp --nproc 2 --global-batch 16
  compare ep2_8l fsdp2_8l
  run ddp2_8l 150 $q --strategy ddp --nproc 2 --global-batch 16 --set train.save_model=false
  run tp2_8l 150 $q --strategy tp --tp-size 2 --global-batch 8 --set train.save_model=false
}

recipe_two_gpu_full_model() {  # the whole model on two H200s: ep 2 vs fsdp 2 (weights compared), naive baseline
  local f="$FULL --global-batch 8 --steps 6 --set train.timing_warmup_steps=3 --set train.compile=true"
  run ep2_full 200 $f --strategy ep --ep-size 2 --nproc 2 --micro-batch 2
  run fsdp2_full 200 $f --strategy fsdp --nproc 2 --micro-batch 1
  compare ep2_full fsdp2_full
  rm -rf "$RUNS"/*/model
  local e="$FULL --global-batch 8 --steps 4 --set train.timing_warmup_steps=2 --micro-batch 1 --set train.compile=false --set train.save_model=false"
  run naive2_full 150 $e --strategy examples/naive_ep/naive_ep.py --ep-size 2 --nproc 2
  run ep2_full_eager 100 $e --strategy ep --ep-size 2 --nproc 2
}

recipe_two_gpu_bench() {  # moectl bench on two H200s (4-layer cut), then a profile of ep 2 on the 8-layer cut
  bench bench2 $FULL --set model.num_layers=4 --nproc 2 --strategies single,ddp,fsdp,tp,mixed,ep \
    --steps 7 --warmup 3 --global-batch 8 --micro-batch 2 --set train.compile=true \
    --verify --reference single --prune-models --run-timeout 150
  run ep2_8l_prof 150 $CUT8 --micro-batch 2 --global-batch 16 --steps 7 --set train.timing_warmup_steps=3 \
    --set train.save_model=false --set train.compile=true --strategy ep --ep-size 2 --nproc 2 --set train.profile_steps=2
  profile ep2_8l_prof
}

recipe_weak_scaling() {  # ep on 1, 2 and 4 GPUs with the same work per GPU (8-layer cut), 4-GPU profile
  local q="$CUT8 --micro-batch 2 --steps 10 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  CUDA_VISIBLE_DEVICES=0 run weak_ep1 200 $q --strategy ep --ep-size 1 --global-batch 8
  CUDA_VISIBLE_DEVICES=0,1 run weak_ep2 200 $q --strategy ep --ep-size 2 --nproc 2 --global-batch 16
  run weak_ep4 200 $q --strategy ep --ep-size 4 --nproc 4 --global-batch 32 --set train.profile_steps=2
  profile weak_ep4
}

recipe_four_gpu_full_model() {  # the whole model on four H200s: ep 4 vs fsdp 4, naive baseline
  local q="$FULL --global-batch 16"
  run ep4 330 $q --strategy ep --ep-size 4 --micro-batch 2 --steps 9 --set train.timing_warmup_steps=3 --set train.compile=true --set train.profile_steps=2
  profile ep4
  run fsdp4 330 $q --strategy fsdp --nproc 4 --micro-batch 1 --steps 9 --set train.timing_warmup_steps=3
  compare ep4 fsdp4
  rm -rf "$RUNS"/*/model
  run naive4 300 $q --strategy examples/naive_ep/naive_ep.py --ep-size 4 --nproc 4 --micro-batch 1 --steps 3 --set train.timing_warmup_steps=1 --set train.save_model=false
}

recipe_four_gpu_bench() {  # moectl bench on four H200s, the whole model, verified against fsdp
  bench bench4 $FULL --nproc 4 --strategies fsdp,tp,mixed,ep --steps 6 --warmup 3 --global-batch 16 \
    --micro-batch 1 --verify --reference fsdp --prune-models --run-timeout 900
}

recipe_four_gpu_layouts() {  # fsdp, tp and mixed on the whole model on four H200s; ddp and fsdp on a 16-layer cut
  local q="$FULL --set train.save_model=false"
  run fsdp_30b 200 $q --strategy fsdp --nproc 4 --steps 6 --global-batch 8 --micro-batch 1 --set train.timing_warmup_steps=3
  run tp_30b 200 $q --strategy tp --tp-size 4 --steps 5 --global-batch 2 --micro-batch 1 --set train.timing_warmup_steps=2
  run mixed_30b 200 $q --strategy mixed --dp-size 2 --tp-size 2 --steps 5 --global-batch 4 --micro-batch 1 --set train.timing_warmup_steps=2
  run ddp_16l 200 $q --set model.num_layers=16 --strategy ddp --nproc 4 --steps 6 --global-batch 8 --micro-batch 1 --set train.timing_warmup_steps=3
  run fsdp_16l 200 $q --set model.num_layers=16 --strategy fsdp --nproc 4 --steps 6 --global-batch 8 --micro-batch 1 --set train.timing_warmup_steps=3
}

recipe_one_gpu_training_features() {  # clipping + aux loss + router bias + load statistics vs all off, 8-layer cut, compiled
  # "off": no clipping, no balancing, no expert-load statistics (the gradient norm is always computed and
  # logged, so it is in both). "on": clipping far below the norm (every step scaled), cosine with warm-up,
  # Qwen3's aux_loss_coef, router bias updates. 3 warm-up + 12 timed steps each; ep 1 and single.
  local q="$CUT8 --global-batch 8 --micro-batch 2 --steps 15 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  local off="--set train.aux_loss_coef=0 --set train.expert_load_stats=false"
  local on="--set train.max_grad_norm=0.001 --set train.lr_schedule=cosine --set train.lr_warmup_steps=2 --set train.aux_loss_coef=0.001 --set train.router_bias_update=0.001"
  run features_off_ep1 300 $q --strategy ep --ep-size 1 $off
  run features_on_ep1 300 $q --strategy ep --ep-size 1 $on
  run features_off_single 300 $q --strategy single $off
  run features_on_single 300 $q --strategy single $on
  $PY - "$RUNS" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
runs = Path(sys.argv[1])
for strategy in ("ep1", "single"):
    times = {}
    for kind in ("off", "on"):
        rows = [json.loads(l) for l in (runs / f"features_{kind}_{strategy}" / "metrics.jsonl").read_text().splitlines()]
        times[kind] = statistics.median(r["step_time_s"] for r in rows if not r["warmup"])
    last = rows[-1]
    print(f"{strategy}: off {times['off']:.4f} s, on {times['on']:.4f} s, cost {100 * (times['on'] / times['off'] - 1):+.2f} %;"
          f" on-run grad_norm {last['grad_norm']:.3g} clipped {last.get('grad_clipped')} load_imbalance {last.get('load_imbalance')} aux {last.get('aux_loss')}")
PYEOF
}

# ep at scale (once-per-rank dispatch, ep_chunks, checkpointing that replays its exchanges): the
# predictions in BENCHMARKS.md, "ep at scale". Priority order: one-gpu-ep-scale, then two-gpu-ep-scale.

TINY_GPU="--steps 6 --global-batch 8 --micro-batch 2 --set train.timing_warmup_steps=2 --set train.compile=true"

ep2_chunks_and_weights() {  # TIMEOUT ARGS...: ep 2 with ep_chunks 1 and 2; the tiny NCCL pipeline (chunks, checkpointing) against single
  local limit=$1; shift
  run ep2_8l_chunks1 "$limit" "$@"
  run ep2_8l_chunks2 "$limit" "$@" --set parallel.ep_chunks=2
  run tiny_single_gpu 90 $TINY_GPU --strategy single
  run tiny_ep2_gpu_chunks2_ac 90 $TINY_GPU --strategy ep --ep-size 2 --nproc 2 --set parallel.ep_chunks=2 --set train.activation_checkpointing=full
  compare tiny_ep2_gpu_chunks2_ac tiny_single_gpu
}

recipe_one_gpu_ep_scale() {  # no regression on one H200 (8-layer cut, compiled, mb2: was 72,849 / 60,546 with AC); bf16 weights on the GPU kernels
  local q="$CUT8 --strategy ep --ep-size 1 --micro-batch 2 --global-batch 8 --steps 7 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  run ep1_8l_scale 200 $q
  run ep1_8l_scale_ac 200 $q --set train.activation_checkpointing=true
  run tiny_single_gpu 90 $TINY_GPU --strategy single
  run tiny_ep1_gpu_ac 90 $TINY_GPU --strategy ep --ep-size 1 --set train.activation_checkpointing=true
  compare tiny_ep1_gpu_ac tiny_single_gpu
}

recipe_one_gpu_ep_chunks() {  # optional: ep_chunks on one GPU is ignored (nothing to exchange); this shows it costs nothing
  run ep1_8l_chunks2 200 $CUT8 --strategy ep --ep-size 1 --micro-batch 2 --global-batch 8 --steps 7 \
    --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true --set parallel.ep_chunks=2
}

recipe_two_gpu_ep_scale() {  # ep 2 weak scaling (was 79 %) with ep_chunks 1 and 2; bf16 weights of the NCCL pipeline with checkpointing
  local q="$CUT8 --strategy ep --ep-size 2 --nproc 2 --micro-batch 2 --global-batch 16 --steps 7 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  ep2_chunks_and_weights 200 $q
}

# Single-H200 speed levers (BENCHMARKS.md, "Single H200: levers toward the hardware limit"): one-gpu-speed
# holds the goal runs and the weight check (~3 GPU-minutes); one-gpu-speed-levers isolates each lever.
SPEED="--set train.timing_warmup_steps=3 --set train.compile=true"
CHUNK="--set train.loss_chunk_tokens=4096"

recipe_one_gpu_speed() {  # 8-layer cut at micro-batch 16 with the chunked loss, checked against single; proxy at mb 3
  run speed_ep_8l_mb16_chunk 200 $CUT8 $SPEED $CHUNK --strategy ep --ep-size 1 --global-batch 16 --micro-batch 16 --steps 8
  run speed_single_8l_ref 200 $CUT8 $SPEED --strategy single --global-batch 16 --micro-batch 4 --steps 8
  compare speed_ep_8l_mb16_chunk speed_single_8l_ref
  rm -rf "$RUNS"/speed_*/model
  run speed_proxy48_mb3_chunk 240 $FULL --set model.num_experts=32 $SPEED $CHUNK --set train.save_model=false \
    --strategy ep --ep-size 1 --global-batch 6 --micro-batch 3 --steps 7
}

recipe_one_gpu_speed_levers() {  # each lever alone: micro-batch 8 with and without the chunked loss, single, selective
  local q="$CUT8 $SPEED --set train.save_model=false --steps 7"
  run speed_ep_8l_mb8 200 $q --strategy ep --ep-size 1 --global-batch 8 --micro-batch 8
  run speed_ep_8l_mb8_chunk 200 $q $CHUNK --strategy ep --ep-size 1 --global-batch 8 --micro-batch 8
  run speed_single_8l_mb16_chunk 200 $q $CHUNK --strategy single --global-batch 16 --micro-batch 16
  run speed_single_8l_mb16_chunk_sel 200 $q $CHUNK --set train.activation_checkpointing=selective \
    --strategy single --global-batch 16 --micro-batch 16
  run speed_proxy48_single_mb4_sel 240 $FULL --set model.num_experts=32 $SPEED $CHUNK --set train.save_model=false \
    --set train.activation_checkpointing=selective --strategy single --global-batch 8 --micro-batch 4 --steps 7
}

# The one-H200 figures of the 2026-11-29 evening lease in one pass, most important first (each line's
# summary lands in $OUT/summaries.jsonl as it finishes): the dispatch's no-regression point and the
# training features' cost (off/on, same flags), checkpointing, the speed goals and their weight check.
recipe_one_gpu_headline() {
  local q="$CUT8 --strategy ep --ep-size 1 --global-batch 8 --micro-batch 2 --steps 12 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  run head_ep1_off 200 $q --set train.aux_loss_coef=0 --set train.expert_load_stats=false
  run head_ep1_on 200 $q --set train.max_grad_norm=0.001 --set train.lr_schedule=cosine --set train.lr_warmup_steps=2 \
    --set train.aux_loss_coef=0.001 --set train.router_bias_update=0.001
  recipe_one_gpu_speed
  run head_ep1_ac 200 $q --set train.aux_loss_coef=0 --set train.expert_load_stats=false --set train.activation_checkpointing=full
}

recipe_two_gpu_ep_chunks() {  # ep 2 weak scaling against head_ep1_off with ep_chunks 1 and 2; NCCL pipeline weights
  local q="$CUT8 --strategy ep --ep-size 2 --nproc 2 --micro-batch 2 --global-batch 16 --steps 8 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true --set train.aux_loss_coef=0 --set train.expert_load_stats=false"
  ep2_chunks_and_weights 200 $q
}

# A four-GPU lease in one pass: three lanes on disjoint GPUs at once (no lane shares a GPU or NVLink
# traffic with another), then the runs that need all four. Lane A: ep 2 on GPUs 0-1 (weak scaling,
# ep_chunks 1 and 2, NCCL pipeline weights); lane B: one-GPU headline on GPU 2 (dispatch no-regression,
# training features off/on, the chunked-loss micro-batch 16 goal, the 48-layer proxy); lane C: single's
# reference for the goal run's weight check on GPU 3. Then ep 4 on the 8-layer cut (chunks 1, 2) and on
# the whole model.
recipe_four_gpu_batch() {
  local ep8="$CUT8 --micro-batch 2 --steps 8 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true --set train.aux_loss_coef=0 --set train.expert_load_stats=false"
  local one="$CUT8 --strategy ep --ep-size 1 --global-batch 8 --micro-batch 2 --steps 12 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true"
  (
    export CUDA_VISIBLE_DEVICES=0,1
    ep2_chunks_and_weights 150 $ep8 --strategy ep --ep-size 2 --nproc 2 --global-batch 16
  ) > "$RUNS/laneA.txt" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=2
    run head_ep1_off 150 $one --set train.aux_loss_coef=0 --set train.expert_load_stats=false
    run head_ep1_on 150 $one --set train.max_grad_norm=0.001 --set train.lr_schedule=cosine --set train.lr_warmup_steps=2 \
      --set train.aux_loss_coef=0.001 --set train.router_bias_update=0.001
    run speed_ep_8l_mb16_chunk 170 $CUT8 $SPEED $CHUNK --strategy ep --ep-size 1 --global-batch 16 --micro-batch 16 --steps 8
    run speed_proxy48_mb3_chunk 200 $FULL --set model.num_experts=32 $SPEED $CHUNK --set train.save_model=false \
      --strategy ep --ep-size 1 --global-batch 6 --micro-batch 3 --steps 7
  ) > "$RUNS/laneB.txt" 2>&1 &
  (
    export CUDA_VISIBLE_DEVICES=3
    run speed_single_8l_ref 170 $CUT8 $SPEED --strategy single --global-batch 16 --micro-batch 4 --steps 8
  ) > "$RUNS/laneC.txt" 2>&1 &
  wait
  cat "$RUNS"/lane[ABC].txt
  compare speed_ep_8l_mb16_chunk speed_single_8l_ref
  rm -rf "$RUNS"/*/model
  run ep4_8l_chunks1 120 $ep8 --strategy ep --ep-size 4 --nproc 4 --global-batch 32
  run ep4_8l_chunks2 120 $ep8 --strategy ep --ep-size 4 --nproc 4 --global-batch 32 --set parallel.ep_chunks=2
  run ep4_full_mb2 200 $FULL --strategy ep --ep-size 4 --nproc 4 --micro-batch 2 --global-batch 16 --steps 6 \
    --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true
}

recipe_two_gpu_ep_alone() {  # ep 2 weak scaling with nothing else on the host: ep_chunks 1 and 2, then a profile of 1
  local q="$CUT8 --strategy ep --ep-size 2 --nproc 2 --micro-batch 2 --global-batch 16 --steps 8 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true --set train.aux_loss_coef=0 --set train.expert_load_stats=false"
  run ep2_alone_chunks1 120 $q
  run ep2_alone_chunks2 120 $q --set parallel.ep_chunks=2
  run ep2_alone_prof 120 $q --set train.profile_steps=2
  profile ep2_alone_prof
}

# The dispatch's slot sums as one elementwise kernel (a gather per slot) and its send-order scan as one
# flat scan, against the same runs on the code before (side by side on the same GPUs, nothing else
# running). BEFORE: a source tree of the commit before (a `git worktree add`); without one, only "after".
DISPATCH8="$CUT8 --micro-batch 2 --steps 8 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true --set train.aux_loss_coef=0 --set train.expert_load_stats=false --strategy ep"

both() {  # both NAME TIMEOUT ARGS...: NAME_after on this tree, then NAME_before on $BEFORE
  local name=$1; shift
  run "${name}_after" "$@"
  # From inside $BEFORE: `python -m` puts the working directory first on the path.
  [ -n "${BEFORE:-}" ] && (cd "$BEFORE" && PYTHONPATH="$BEFORE" run "${name}_before" "$@")
}

recipe_four_gpu_dispatch_pairs() {  # ep 1, 2 and 4 with the same work per GPU, before and after, side by side
  CUDA_VISIBLE_DEVICES=0 both disp_ep1 150 $DISPATCH8 --ep-size 1 --global-batch 8 --steps 12
  CUDA_VISIBLE_DEVICES=0,1 both disp_ep2 150 $DISPATCH8 --ep-size 2 --nproc 2 --global-batch 16
  both disp_ep4 150 $DISPATCH8 --ep-size 4 --nproc 4 --global-batch 32
}

recipe_four_gpu_dispatch() {  # the pairs, whole-model ep 4, NCCL weights with chunks and checkpointing, an ep 2 profile
  recipe_four_gpu_dispatch_pairs
  run disp_ep4_full 240 $FULL --strategy ep --ep-size 4 --nproc 4 --micro-batch 2 --global-batch 16 --steps 6 \
    --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true
  CUDA_VISIBLE_DEVICES=2 run tiny_single_gpu 90 $TINY_GPU --strategy single &
  CUDA_VISIBLE_DEVICES=0,1 run tiny_ep2_gpu_chunks2_ac 90 $TINY_GPU --strategy ep --ep-size 2 --nproc 2 \
    --set parallel.ep_chunks=2 --set train.activation_checkpointing=full
  wait
  compare tiny_ep2_gpu_chunks2_ac tiny_single_gpu
  CUDA_VISIBLE_DEVICES=0,1 run disp_ep2_prof 120 $DISPATCH8 --ep-size 2 --nproc 2 --global-batch 16 --set train.profile_steps=2
  profile disp_ep2_prof
}

recipe_one_gpu_dispatch() {  # the single-GPU speed goals after, their weight check
  CUDA_VISIBLE_DEVICES=1 run speed_single_8l_ref 170 $CUT8 $SPEED --strategy single --global-batch 16 --micro-batch 4 --steps 8 &
  CUDA_VISIBLE_DEVICES=0 run speed_ep_8l_mb16_chunk 170 $CUT8 $SPEED $CHUNK --strategy ep --ep-size 1 --global-batch 16 --micro-batch 16 --steps 8
  wait
  compare speed_ep_8l_mb16_chunk speed_single_8l_ref
  rm -rf "$RUNS"/speed_*/model
  CUDA_VISIBLE_DEVICES=0 run speed_proxy48_mb3_chunk 200 $FULL --set model.num_experts=32 $SPEED $CHUNK --set train.save_model=false \
    --strategy ep --ep-size 1 --global-batch 6 --micro-batch 3 --steps 7
}

recipe_four_gpu_dispatch_more() {  # the ep 2 pair again, the whole model before and after, ep_chunks 2 after
  CUDA_VISIBLE_DEVICES=0,1 both disp_ep2_again 150 $DISPATCH8 --ep-size 2 --nproc 2 --global-batch 16
  both disp_ep4_full 240 $FULL --strategy ep --ep-size 4 --nproc 4 --micro-batch 2 --global-batch 16 --steps 6 \
    --set train.timing_warmup_steps=3 --set train.save_model=false --set train.compile=true
  CUDA_VISIBLE_DEVICES=0,1 run disp_ep2_chunks2_after 150 $DISPATCH8 --ep-size 2 --nproc 2 --global-batch 16 --set parallel.ep_chunks=2
  run disp_ep4_chunks2_after 150 $DISPATCH8 --ep-size 4 --nproc 4 --global-batch 32 --set parallel.ep_chunks=2
}

# FP8 (`train.fp8`) beside bf16, same flags otherwise, one after the other on the same GPU. The wheel of
# torchao travels with the tree where the image lacks it (BENCHMARKS.md, "FP8 GEMMs").
FP8="--set train.fp8=true"
PROXY="$FULL --set model.num_experts=32 $SPEED $CHUNK --set train.save_model=false --strategy ep --ep-size 1"

fp8_smoke() {  # 4 FP8 steps on the cut; fails (with the log's end) if they do not run
  run fp8_smoke_8l 200 $CUT8 $SPEED $FP8 --set train.save_model=false --strategy ep --ep-size 1 \
    --global-batch 4 --micro-batch 2 --steps 4
  [ -f "$RUNS/fp8_smoke_8l/summary.json" ] || { tail -30 "$RUNS/fp8_smoke_8l.log"; return 1; }
}

recipe_one_gpu_fp8() {  # the proxy's goal run with FP8 q/o projections and in bf16, side by side (H200: 118 GiB)
  run fp8_proxy48_mb3_chunk 240 $PROXY $FP8 --global-batch 6 --micro-batch 3 --steps 7
  [ -f "$RUNS/fp8_proxy48_mb3_chunk/summary.json" ] || tail -30 "$RUNS/fp8_proxy48_mb3_chunk.log"
  run bf16_proxy48_mb3_chunk 240 $PROXY --global-batch 6 --micro-batch 3 --steps 7
}

fp8_curves() {  # MICRO_BATCH: 50 steps of the cut, FP8 and bf16, global batch 16: loss curves and speed
  local q="$CUT8 $SPEED $CHUNK --set train.save_model=false --strategy ep --ep-size 1 --global-batch 16 --micro-batch $1 --steps 50"
  run fp8_8l_mb$1_50 300 $q $FP8
  run bf16_8l_mb$1_50 300 $q
}

recipe_one_gpu_fp8_curves() {  # the FP8 smoke, then 50-step curves of the cut (MB=16 on an H200, 8 on an H100)
  fp8_smoke || return 1
  fp8_curves "${MB:-16}"
}

recipe_one_gpu_fp8_profile() {  # where FP8's time goes: the cut at micro-batch 8, FP8 and bf16, two profiled steps each
  local q="$CUT8 $SPEED $CHUNK --set train.save_model=false --strategy ep --ep-size 1 --global-batch 8 --micro-batch 8 --steps 6 --set train.profile_steps=2"
  run fp8_8l_mb8_prof 240 $q $FP8
  profile fp8_8l_mb8_prof
  run bf16_8l_mb8_prof 240 $q
  profile bf16_8l_mb8_prof
}

recipe_one_gpu_fp8_h100() {  # what fits an H100 (80 GB): the cut's 50-step curves at micro-batch 8 and the proxy at micro-batch 1, FP8 q/o and bf16
  fp8_curves 8
  run fp8_proxy48_mb1_chunk 240 $PROXY $FP8 --global-batch 4 --micro-batch 1 --steps 7
  run bf16_proxy48_mb1_chunk 240 $PROXY --global-batch 4 --micro-batch 1 --steps 7
}

recipe_forked_workers() {  # workers forked from the launcher's worker server use the GPU (bench/forked_workers.py)
  $PY bench/forked_workers.py "$RUNS/forked_workers" 2>&1 | tee "$OUT/forked_workers.log"
}

recipe_two_gpu_console() {  # what a first run shows on the GPU image: no stray lines on the console or in rank logs
  run console_single 300 --steps 5 --strategy single
  run console_ddp 300 --steps 5 --strategy ddp --nproc 2
  for name in console_single console_ddp; do
    cp "$RUNS/$name.log" "$OUT/$name.log"
    echo "== $name: lines other than progress and the summary (expected: none)"
    grep -vE "^(step [0-9]+: |done: run directory|  [a-zA-Z ]+  )" "$RUNS/$name.log" || true
  done
  for log in "$RUNS"/console_ddp/logs/rank*.log; do
    cp "$log" "$OUT/console_ddp_$(basename "$log")"
    echo "== $(basename "$log"): lines other than its header and steps (expected: none)"
    grep -vE "^(== moectl worker rank |step [0-9]+: )" "$log" || true
  done
}

recipe_four_gpu_export() {  # moectl export on the GPU image: bf16 checkpoints of ep 4 and mixed (fsdp 2 x tp 2), 8-layer cut
  # Each step-4 export must equal the run's model/ exactly (compare-weights at rtol 0), with the export's
  # peak RSS near the largest tensor (gate_up_proj, 0.8 GB in bf16), not the 11 GB model; transformers loads it.
  local q="$CUT8 --global-batch 8 --micro-batch 2 --steps 4 --checkpoint-every 2 --set train.timing_warmup_steps=1"
  run ep4_export 300 $q --strategy ep --ep-size 4 --nproc 4
  run mixed4_export 300 $q --strategy mixed --dp-size 2 --tp-size 2 --nproc 4
  for name in ep4_export mixed4_export; do
    $PY - "$RUNS/$name" <<'PYEOF'
import resource, subprocess, sys, time
run, started = sys.argv[1], time.time()
subprocess.run([sys.executable, "-m", "moectl", "export", f"{run}/checkpoints/step_000004", f"{run}_hf"], check=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"export of {run}: {time.time() - started:.0f} s, peak RSS {peak:.2f} GiB")
PYEOF
    $MOECTL compare-weights "$RUNS/${name}_hf" "$RUNS/$name/model" --rtol 0 --per-tensor-rtol 0 | tail -2
  done
  $PY - "$RUNS/ep4_export_hf" <<'PYEOF'
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("from_pretrained:", model.dtype, f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
PYEOF
  rm -rf "$RUNS"/*_export_hf
}

recipe_packed_documents() {  # 8-layer cut on one GPU, packed rows of long-tailed documents (mean ~1,000
  # tokens): plain causal vs document masking under sdpa and flex_attention; validation every 10 steps
  local cache="$RUNS/packed-cache"
  [ -f "$cache/meta.json" ] || $PY bench/packed_cache.py "$cache" --tokens 8000000 --mean-length 1000
  local q="$CUT8 --data $cache --strategy ep --ep-size 1 --global-batch 8 --micro-batch 2 --steps 14 --set train.timing_warmup_steps=4 --set train.save_model=false --set train.compile=true"
  run packed_causal 300 $q --set data.document_masking=false
  run packed_docmask_sdpa 300 $q
  run packed_docmask_flex 300 $q --set train.attention=flex_attention
  run packed_docmask_sdpa_val 300 $q --set data.val_fraction=0.01 --set train.eval_every=5
  grep -h '"val_time_s"' "$RUNS"/packed_docmask_sdpa_val/metrics.jsonl | $PY -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print('step', r['step'], 'val_loss', round(r['val_loss'], 4), 'val_tokens', r['val_tokens'], 'val_time_s', round(r['val_time_s'], 3))"
}

recipe_one_gpu_h100_calibration() {  # moectl plan's model on one H100: six runs of the 8-layer cut, predicted before
  # they ran (BENCHMARKS.md, "The planner for H100, A100 and B200"; python3 bench/predict_h100.py): ep 1 at micro-batch
  # 1, 2 and 8, single at 2 and 8, the loss whole and chunked at 8. Pure bf16, as the calibration's runs
  # (train.precision=bf16 where the tree has it, train.dtype=bfloat16 before); balancing and load statistics off, which
  # the model does not count. About 5 minutes; each run's summary (with `predicted`) lands in $OUT/summaries.jsonl.
  local bf16
  bf16=$($PY -c "from moectl.config import TrainConfig as T; print('--set train.precision=bf16' if 'precision' in T.__dataclass_fields__ else '--set train.dtype=bfloat16')")
  local q="$CUT8 $SPEED $bf16 --set train.save_model=false --set train.aux_loss_coef=0 --set train.expert_load_stats=false --global-batch 8 --steps 8"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  run h100_ep1_mb1 240 $q --strategy ep --ep-size 1 --micro-batch 1
  run h100_ep1_mb2 200 $q --strategy ep --ep-size 1 --micro-batch 2
  run h100_single_mb2 200 $q --strategy single --micro-batch 2
  run h100_ep1_mb8 200 $q --strategy ep --ep-size 1 --micro-batch 8
  run h100_ep1_mb8_chunk 200 $q $CHUNK --strategy ep --ep-size 1 --micro-batch 8
  run h100_single_mb8_chunk 200 $q $CHUNK --strategy single --micro-batch 8
}

# Precision (`train.precision`, BENCHMARKS.md "Precision"): `mixed` (fp32 weights, gradients and optimizer
# state, bf16 compute; the GPU default) against `bf16` (all bf16, the GPU default before), same flags, one
# after the other on the same GPU. Each run's dry-run estimate is printed beside it (the estimate counts
# mixed's fp32 copies; what it leaves out, the fp32 residual stream under autocast, shows here).
PREC_CUT="$CUT8 $SPEED $CHUNK --set train.save_model=false --strategy ep --ep-size 1 --global-batch 16 --steps 8"
PREC_PROXY="$PROXY --global-batch 4 --micro-batch 1 --steps 7"

precision_pair() {  # NAME TIMEOUT ARGS...: NAME_bf16 and NAME_mixed, each after its dry-run estimate
  local name=$1 limit=$2; shift 2
  for precision in bf16 mixed; do
    $MOECTL train "$@" --set train.precision=$precision --dry-run 2>/dev/null | grep -E "precision|memory estimate" | tr -s ' '
    run "${name}_${precision}" "$limit" "$@" --set train.precision=$precision
  done
}

precision_table() {  # the pairs' tokens/s per device and peak memory side by side, mixed's cost in %
  $PY - "$OUT/summaries.jsonl" <<'PYEOF'
import json, sys
rows = {r["run"]: r for r in map(json.loads, open(sys.argv[1]))}
print("| run | bf16 tokens/s | mixed tokens/s | mixed's cost | bf16 peak GiB | mixed peak GiB |")
print("| --- | --- | --- | --- | --- | --- |")
for name in sorted({run.rsplit("_", 1)[0] for run in rows if run.endswith(("_bf16", "_mixed"))}):
    bf16, mixed = rows.get(f"{name}_bf16"), rows.get(f"{name}_mixed")
    if not (bf16 and mixed):
        print(f"| {name} | {'—' if not bf16 else round(bf16['tokens_per_s_per_device'])} | {'—' if not mixed else round(mixed['tokens_per_s_per_device'])} | one run missing (see its log) | | |")
        continue
    a, b = bf16["tokens_per_s_per_device"], mixed["tokens_per_s_per_device"]
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {100 * (1 - b / a):+.1f} % | {bf16['peak_mem_gib']:.1f} | {mixed['peak_mem_gib']:.1f} |")
PYEOF
}

recipe_one_gpu_precision() {  # one H200: the cut at micro-batch 8 and 16, the 48-layer proxy at 1; bf16 vs mixed
  # mixed holds 10 bytes per weight (fp32 weight and gradient, a bf16 copy) against bf16's 4: the cut at
  # micro-batch 16 is estimated at 128 GiB (+ the fp32 residual stream), so micro-batch 8 is the pair that
  # surely fits; on an H100 (80 GB) run MB=2 PROXY=0 (the proxy's mixed weights alone take 88 GB).
  precision_pair prec_cut_mb${MB:-8} 200 $PREC_CUT --micro-batch "${MB:-8}"
  [ -z "${MB:-}" ] && precision_pair prec_cut_mb16 200 $PREC_CUT --micro-batch 16
  [ "${PROXY:-1}" = 1 ] && precision_pair prec_proxy48_mb1 240 $PREC_PROXY
  precision_table
}

# Fine-tuning at lr 1e-5 with AdamW: 300 steps of the cut, 2 sequences of 4096 per step (the same data in
# every run), loss curves of fp32, mixed and bf16 in one plot (bench/loss_curves.py, against fp32).
# fp32's 8 GEMMs per token and layer run on the CUDA cores (~10x slower than bf16), so it runs alone first,
# as its own call: `bash bench/run.sh one-gpu-precision-curves-fp32`, then `bash bench/run.sh
# one-gpu-precision-curves` on the same machine (the curves read $RUNS). One H200: AdamW's fp32 state of the
# cut's 5.6 B weights is 45 GB, 101 GB with mixed's weights and gradients (fp32: 90 GB).
PREC_TUNE="$CUT8 $SPEED $CHUNK --set train.save_model=false --strategy ep --ep-size 1 --global-batch 2 --micro-batch 2 --steps 300 --lr 1e-5 --set train.optimizer=adamw --set train.expert_load_stats=false"

recipe_one_gpu_precision_curves_fp32() {  # the fp32 run of the curves (about 6-7 minutes on an H200)
  run tune_fp32 590 $PREC_TUNE --set train.precision=fp32
}

recipe_one_gpu_precision_curves() {  # bf16 and mixed runs of the curves, then the plot against fp32
  run tune_mixed 280 $PREC_TUNE --set train.precision=mixed
  run tune_bf16 280 $PREC_TUNE --set train.precision=bf16
  local reference="$RUNS/tune_fp32"
  [ -f "$reference/metrics.jsonl" ] || { echo "no $reference: run one-gpu-precision-curves-fp32 first; plotting against mixed"; reference="$RUNS/tune_mixed"; }
  $PY bench/loss_curves.py "$reference" "$RUNS/tune_mixed" "$RUNS/tune_bf16" --plot "$OUT/precision_curves.png" | grep -v "^| tune_mixed | tune_mixed"
}

# moectl plan under mixed (BENCHMARKS.md, "moectl plan under mixed"): the whole model with AdamW, the plan's
# first row under mixed and the same layout under bf16, each after its dry-run estimate. Predicted (H200):
# mixed 7,685 tokens/s per GPU at 115.3 GiB, bf16 8,330 at 58.6 GiB; the 8 x H100 pair: mixed 5,741 at 58.2
# GiB, bf16 6,314 at 30.9 (on 8 H200s 6,697 and 7,270). lr 1e-5: AdamW at the preset's SGD lr of 0.1 would
# diverge.
PLAN_ADAMW="$FULL --global-batch 8 --steps 6 --set train.timing_warmup_steps=3 --set train.save_model=false --set train.optimizer=adamw --lr 1e-5 --strategy ep --set parallel.fsdp=true --set train.activation_checkpointing=true"

recipe_four_gpu_precision_plan() {  # four H200s: ep 4 with FSDP, micro-batch 2, checkpointing; bf16 vs mixed
  precision_pair plan_adamw_ep4 600 $PLAN_ADAMW --ep-size 4 --nproc 4 --micro-batch 2
  precision_table
}

recipe_eight_gpu_precision_plan() {  # eight H100s (or H200s): ep 8 with FSDP, micro-batch 1, checkpointing; bf16 vs mixed
  precision_pair plan_adamw_ep8 600 $PLAN_ADAMW --ep-size 8 --nproc 8 --micro-batch 1
  precision_table
}

recipe_one_gpu_precision_fp8() {  # train.fp8 under mixed runs (fp32 master weights through torchao's Float8Linear): 4 steps of the cut
  run fp8_mixed_smoke 200 $CUT8 $SPEED $FP8 --set train.save_model=false --strategy ep --ep-size 1 \
    --global-batch 4 --micro-batch 2 --steps 4 --set train.precision=mixed
  [ -f "$RUNS/fp8_mixed_smoke/summary.json" ] || tail -30 "$RUNS/fp8_mixed_smoke.log"
}
