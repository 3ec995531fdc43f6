# Sourced by every bench/gpu_*.sh script: the environment for runs on the lent H200 machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
MOECTL="$PY -m moectl"
# Show the tail of one run's log in the reply, keep the whole log under $OUT.
run() {  # run NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "=== $name: moectl $*"
  timeout "$limit" $MOECTL train "$@" --run-dir "$OUT/runs/$name" >"$OUT/$name.log" 2>&1
  echo "exit $?"; grep -E "^(\[default_role0\]:)?step [0-9]+:" "$OUT/$name.log" | tail -3; grep -E "error|Error" "$OUT/$name.log" | tail -3
  [ -f "$OUT/runs/$name/summary.json" ] && $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('strategy','world_size','median_step_time_s','tokens_per_s_per_device','mfu','mfu_seed','peak_mem_gib','final_loss')})" "$OUT/runs/$name/summary.json"
}
