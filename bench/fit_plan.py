"""Re-fit `moectl plan`'s fitted figures from the measured runs and print predicted against measured.

    python3 bench/fit_plan.py            # the table with the figures in moectl/plan_data.py
    python3 bench/fit_plan.py --fit      # least-squares re-fit first (relative step-time error), then the table
    python3 bench/fit_plan.py --pending  # the predictions of the runs scripted in bench/ but not run yet

Each fitted figure enters the step time linearly (a time per token and layer, an idle time per layer,
1 / bandwidth, an exposed share), so each group is one weighted linear least-squares solve over the runs
whose role is "fit"; runs with any other role never move a figure.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from moectl.plan import predict, run_config
from moectl.plan_data import CALIBRATION, MEASURED_RUNS, Calibration, MeasuredRun

# (figures, the runs that set them); each group is solved with the figures of the groups before it.
GROUPS = [
    (("seconds_per_token_layer_compiled", "seconds_per_layer_sync"), lambda r: r.world == 1 and r.compile),
    (("seconds_per_token_layer_eager",), lambda r: r.world == 1 and not r.compile),
    (("all_to_all_bytes_per_s",), lambda r: r.strategy == "ep" and r.ep > 1),
    (("ddp_overlap",), lambda r: r.strategy == "ddp"),
    (("fsdp_exposure",), lambda r: r.strategy == "fsdp"),
]
INVERSE = {"all_to_all_bytes_per_s"}  # enters as 1 / figure
COMPLEMENT = {"ddp_overlap"}  # enters as 1 - figure


def step_time(run: MeasuredRun, cal: Calibration) -> float:
    model, train, layout = run_config(run)
    return predict(model, train, layout, num_gpus=run.world, cal=cal).step_time_s


def measured_step_time(run: MeasuredRun) -> float:
    return run.global_batch * run.seq_len / (run.tokens_per_s_per_gpu * run.world)


def _as_linear(name: str, value: float) -> float:
    return 1 / value if name in INVERSE else (1 - value if name in COMPLEMENT else value)


def _from_linear(name: str, value: float) -> float:
    return 1 / value if name in INVERSE else (1 - value if name in COMPLEMENT else value)


def fit(cal: Calibration) -> Calibration:
    for names, selects in GROUPS:
        runs = [r for r in MEASURED_RUNS if r.role == "fit" and selects(r)]
        zero = dataclasses.replace(cal, **{n: _from_linear(n, 1e-30 if n in INVERSE else 0.0) for n in names})
        if "all_to_all_bytes_per_s" in names:
            zero = dataclasses.replace(zero, all_to_all_bytes_per_s=1e30)
        base = np.array([step_time(r, zero) for r in runs])
        columns = []
        for name in names:
            unit = dataclasses.replace(zero, **{name: _from_linear(name, 1.0)})
            columns.append([step_time(r, unit) for r in runs] - base)
        measured = np.array([measured_step_time(r) for r in runs])
        matrix = np.array(columns).T / measured[:, None]
        solution, *_ = np.linalg.lstsq(matrix, 1 - base / measured, rcond=None)
        cal = dataclasses.replace(
            cal, **{n: _from_linear(n, float(x)) for n, x in zip(names, solution, strict=True)}
        )
        print(", ".join(f"{n} = {getattr(cal, n):.4g}" for n in names), f"(from {len(runs)} runs)")
    return cal


def table(cal: Calibration) -> str:
    rows = [
        "| run | date | role | tokens/s per GPU: measured | predicted | error | peak GiB: measured | predicted "
        "| error | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in MEASURED_RUNS:
        if run.role == "pending":
            continue
        if run.role == "out of scope":
            rows.append(
                f"| {run.name} | {run.date} | {run.role} | {run.tokens_per_s_per_gpu:,.0f} | — | — "
                f"| {run.peak_mem_gib:.2f} | — | — | {run.note} |"
            )
            continue
        model, train, layout = run_config(run)
        p = predict(model, train, layout, num_gpus=run.world, cal=cal)
        speed = p.tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1
        memory = p.peak_mem_gib / run.peak_mem_gib - 1
        rows.append(
            f"| {run.name} | {run.date} | {run.role} | {run.tokens_per_s_per_gpu:,.0f} | "
            f"{p.tokens_per_s_per_gpu:,.0f} | {100 * speed:+.1f} % | {run.peak_mem_gib:.2f} | "
            f"{p.peak_mem_gib:.2f} | {100 * memory:+.1f} % | {run.note} |"
        )
    return "\n".join(rows)


def pending_table(cal: Calibration) -> str:
    rows = [
        "| run | script (run name) | tokens/s per GPU | MFU | step time | exposed comm | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in (r for r in MEASURED_RUNS if r.role == "pending"):
        model, train, layout = run_config(run)
        p = predict(model, train, layout, num_gpus=run.world, cal=cal)
        comm = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in p.comm_s.items()) or "—"
        rows.append(
            f"| {run.name} | {run.script} ({run.recipe.split()[1]}) | {p.tokens_per_s_per_gpu:,.0f} | "
            f"{100 * p.mfu:.1f} % | {p.step_time_s:.2f} s | {comm} | {p.peak_mem_gib:.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    calibration = fit(CALIBRATION) if "--fit" in sys.argv else CALIBRATION
    print(pending_table(calibration) if "--pending" in sys.argv else table(calibration))
