#!/usr/bin/env bash
# Run named GPU benchmark recipes: `bash bench/run.sh RECIPE [RECIPE…]` (`bash bench/run.sh` lists them).
# Each table in BENCHMARKS.md names the recipe that made it. Logs and run directories go under $RUNS;
# `pack` leaves them as one file in $OUT (what the device tool brings back).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/gpu-out}" RUNS="${RUNS:-/tmp/moectl-runs}"
mkdir -p "$OUT" "$RUNS"
PY="${PY:-python3}"
MOECTL="$PY -m moectl"

run() {  # run NAME TIMEOUT_S TRAIN_ARGS...: one `moectl train`, its log under $RUNS, its summary shown
  local name=$1 limit=$2 started=$SECONDS; shift 2
  echo "=== $name: moectl train $*"
  timeout "$limit" $MOECTL train "$@" --run-dir "$RUNS/$name" >"$RUNS/$name.log" 2>&1
  echo "exit $? after $((SECONDS - started)) s"
  grep -E "step [0-9]+:" "$RUNS/$name.log" | tail -2; grep -E "error|Error" "$RUNS/$name.log" | tail -3
  # Its summary on the console, and one line in $OUT/summaries.jsonl (what comes back even if a later
  # run is cut off at the command's time limit).
  [ -f "$RUNS/$name/summary.json" ] && $PY - "$RUNS/$name/summary.json" "$name" "$OUT/summaries.jsonl" <<'PYEOF'
import json, sys
summary = json.load(open(sys.argv[1]))
summary.pop("losses", None)
summary["run"] = sys.argv[2]
keys = ("strategy", "world_size", "median_step_time_s", "tokens_per_s_per_device", "mfu", "peak_mem_gib",
        "final_loss", "a2a_bytes_per_step", "predicted")
print({k: summary.get(k) for k in keys if k in summary})
with open(sys.argv[3], "a") as out:
    out.write(json.dumps(summary) + "\n")
PYEOF
}
compare() {  # compare RUN_A RUN_B: bf16 weights of two runs' models, the report kept as JSON
  $MOECTL compare-weights "$RUNS/$1/model" "$RUNS/$2/model" --top 5 --json "$RUNS/compare_$1_$2.json" | tail -9
}
profile() {  # profile RUN: the top of its torch.profiler table, the table kept in $OUT
  cp "$RUNS/$1/profile.txt" "$OUT/profile_$1.txt" && head -40 "$OUT/profile_$1.txt" | cut -c1-90,150-215
}
bench() {  # bench NAME BENCH_ARGS...: `moectl bench` into $RUNS/NAME, bench.json and the plot in $OUT
  local name=$1; shift
  $MOECTL bench "$@" --out "$RUNS/$name" 2>&1 | tee "$OUT/$name.log" | tail -25
  echo "moectl bench exit code ${PIPESTATUS[0]}"
  cp "$RUNS/$name/bench.json" "$OUT/$name.json"; cp "$RUNS/$name/bench.png" "$OUT/$name.png"
}
pack() {  # everything but models and traces, as one file in $OUT
  rm -rf "$RUNS"/*/model "$RUNS"/*/profile_trace.json "$RUNS"/*/checkpoints
  tar -czf "$OUT/runs.tar.gz" -C "$RUNS" . && echo "packed: $(du -h "$OUT/runs.tar.gz" | cut -f1)"
}

source bench/recipes.sh
if [ $# -eq 0 ]; then
  echo "usage: bash bench/run.sh RECIPE [RECIPE…]; recipes:"
  declare -F | awk '{print $3}' | grep '^recipe_' | sed 's/^recipe_/  /; s/_/-/g'
  exit 2
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.device_count(), 'GPUs')"
for recipe in "$@"; do
  fn="recipe_${recipe//-/_}"
  declare -F "$fn" >/dev/null || { echo "unknown recipe $recipe (bash bench/run.sh lists them)"; exit 2; }
  echo "##### $recipe"; "$fn"
done
pack
