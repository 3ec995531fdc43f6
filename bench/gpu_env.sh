# Sourced by every bench/gpu_*.sh script: the environment for runs on the lent H200 machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# $OUT comes back from the device tool (at most 8 files): logs and run directories live under $RUNS
# and are packed into $OUT/runs.tar.gz by `pack` (models and traces left out).
export OUT="${OUT:-$PWD/gpu-out}" RUNS="${RUNS:-/tmp/moectl-runs}"
mkdir -p "$OUT" "$RUNS"
PY="${PY:-python3}"
MOECTL="$PY -m moectl"
# Show the tail of one run's log in the reply, keep the whole log under $RUNS.
run() {  # run NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2 started=$SECONDS; shift 2
  echo "=== $name: moectl train $*"
  timeout "$limit" $MOECTL train "$@" --run-dir "$RUNS/$name" >"$RUNS/$name.log" 2>&1
  echo "exit $? after $((SECONDS - started)) s"
  grep -E "^(\[default_role0\]:)?step [0-9]+:" "$RUNS/$name.log" | tail -2; grep -E "error|Error" "$RUNS/$name.log" | tail -3
  [ -f "$RUNS/$name/summary.json" ] && $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('strategy','world_size','median_step_time_s','tokens_per_s_per_device','mfu','mfu_seed','peak_mem_gib','final_loss')})" "$RUNS/$name/summary.json"
}
pack() {  # everything but models and traces, as one file in $OUT
  tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*/model' --exclude='*/model.*' --exclude='*trace.json' --exclude='*/checkpoints' . && echo "packed: $(du -h "$OUT/runs.tar.gz" | cut -f1)"
}
