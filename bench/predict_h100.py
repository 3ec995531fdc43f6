"""`moectl plan`'s predictions for the runs of recipe one-gpu-h100-calibration, written before they ran.

    python3 bench/predict_h100.py    # the tables of BENCHMARKS.md ("The planner for H100, A100 and B200")

The runs are the pending `MeasuredRun` lines of recipe key "h1" in moectl/plan/calibration.py, each
predicted for an H100 (uncalibrated: the makers' figures, the H200's efficiencies). Below them, the same
model against the bf16 runs an H100 made on 2026-12-07 (recipe one-gpu-fp8-h100 and one-gpu-fp8-profile,
bench/results/2026-12-07-h100x1): measured before this model existed and not used to set any figure.
"""

from __future__ import annotations

import sys

from moectl.plan.calibration import CHUNKED, L8, MEASURED_RUNS, PROXY, MeasuredRun, is_calibrated
from moectl.plan.predict import predict, run_config

RECIPE_KEY = "h1"

#: The 2026-12-07 H100 runs in bf16 (summaries_*.jsonl there); balancing and load statistics on, as the
#: preset has them. Kept here, not in MEASURED_RUNS: the H100 stays uncalibrated until the recipe's runs land.
EARLIER_H100_RUNS = [
    MeasuredRun("bf16_8l_mb8_50 (curves)", "2026-12-07", "h100x1", "- bf16_8l_mb8_50", "ep", 1, 1, 1, 8, 16, L8,
                True, False, 88044, 61.66, "check", "50 steps", train=CHUNKED),
    MeasuredRun("bf16_8l_mb8_50 (q/o pair)", "2026-12-07", "h100x1", "- bf16_8l_mb8_50", "ep", 1, 1, 1, 8, 16, L8,
                True, False, 87360, 61.66, "check", "50 steps", train=CHUNKED),
    MeasuredRun("bf16_8l_mb8_prof", "2026-12-07", "h100x1", "- bf16_8l_mb8_prof", "ep", 1, 1, 1, 8, 8, L8,
                True, False, 86778, 51.21, "check", "torch.profiler on 2 of its 3 timed steps", train=CHUNKED),
    MeasuredRun("bf16_proxy48_mb1_chunk", "2026-12-07", "h100x1", "- bf16_proxy48_mb1_chunk", "ep", 1, 1, 1, 1, 4,
                PROXY, True, False, 13680, 62.69, "check", "48 layers of 32 experts", train=CHUNKED),
]  # fmt: skip


def pending_runs() -> list[MeasuredRun]:
    return [r for r in MEASURED_RUNS if r.recipe.split()[0] == RECIPE_KEY]


def _layout(run: MeasuredRun) -> str:
    chunk = run.train.get("loss_chunk_tokens", 0)
    layers = run.model.get("num_layers", 48)
    return (
        f"{run.strategy}{' 1' if run.strategy == 'ep' else ''}, {layers} layers, global batch {run.global_batch}, "
        f"micro-batch {run.micro_batch}, loss {'chunked ' + format(chunk, ',') if chunk else 'whole'}"
    )


def predictions() -> list[tuple[MeasuredRun, object]]:
    out = []
    for run in pending_runs():
        train, strategy = run_config(run)
        out.append((run, predict(strategy, train, run.gpu)))
    return out


def pending_table() -> str:
    rows = [
        "| run (`bench/run.sh` name) | layout | tokens/s per GPU | MFU | step time | peak GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run, p in predictions():
        rows.append(
            f"| {run.name} (`{run.recipe.split()[1]}`) | {_layout(run)} | **{p.tokens_per_s_per_gpu:,.0f}** | "
            f"{100 * p.mfu:.1f} % | {p.step_time_s:.3f} s | **{p.peak_mem_gib:.1f}** |"
        )
    return "\n".join(rows)


def earlier_table() -> str:
    rows = [
        "| run (2026-12-07) | layout | tokens/s per GPU: measured | predicted | error | peak GiB: measured "
        "| predicted | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in EARLIER_H100_RUNS:
        train, strategy = run_config(run)
        p = predict(strategy, train, run.gpu)
        speed = p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1
        memory = p.peak_mem_gib / run.peak_mem_gib - 1
        rows.append(
            f"| {run.name} ({run.note}) | {_layout(run)} | {run.tokens_per_s_per_gpu:,.0f} | "
            f"{p.tokens_per_s_per_gpu:,.0f} | {100 * speed:+.1f} % | {run.peak_mem_gib:.2f} | "
            f"{p.peak_mem_gib:.1f} | {100 * memory:+.1f} % |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    state = "calibrated" if is_calibrated("h100") else "uncalibrated"
    print(f"H100 ({state}): recipe one-gpu-h100-calibration, predicted by moectl plan's model\n")
    print(pending_table())
    print("\nThe same model against the H100's bf16 runs of 2026-12-07 (not used to set any figure):\n")
    print(earlier_table())


if __name__ == "__main__":
    main(sys.argv[1:])
