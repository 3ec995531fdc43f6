"""`moectl bench`: speed and correctness of many strategies, one `moectl train` subprocess each.

Why subprocesses of the real CLI (`python -m moectl train ... --run-dir OUT/runs/<name>`): the
numbers are then those of the code path users run, a strategy that crashes, hangs or runs out of
memory takes only its own row down, and every run leaves an ordinary run directory behind.

Flow: the input is checked and the runs are listed first (moectl/bench/run_list.py). Then the reference
(with `--verify`) runs first, the other strategies after it (moectl/bench/one_run.py), each one compared
with the reference as soon as it ends (moectl/bench/verify.py). bench.json (moectl/bench/record.py; its
schema is in the README) is rewritten atomically after every run, so a bench that is interrupted still
leaves what it measured; the table and the plot come from moectl/bench/report.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time

from rich.console import Console
from rich.markup import escape

from moectl.bench.one_run import run_one
from moectl.bench.record import BenchResult, RunRecord, write_json
from moectl.bench.report import describe_record, print_table, write_plot
from moectl.bench.run_list import BenchOptions, BenchPlan, RunSpec, plan_bench
from moectl.bench.verify import verification
from moectl.tables import output_console


def run_bench(plan: BenchPlan, console: Console) -> BenchResult:
    """Run the reference first, then every other row; compare each with the reference as it ends."""
    options, out = plan.options, plan.options.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [RunRecord(s.name, s.strategy, s.nproc, s.args, [], f"runs/{s.name}") for s in plan.specs]
    for spec, row in zip(plan.specs, rows, strict=True):
        if spec.skip_reason:
            row.status, row.reason, row.run_dir = "skipped", spec.skip_reason, ""
    reference_run = None
    if plan.reference:
        reference_run = RunRecord(plan.reference.name, plan.reference.strategy, plan.reference.nproc, [])
    result = BenchResult(plan, rows, reference_run, time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    order: list[tuple[RunSpec, int | None]] = [(plan.reference, None)] if plan.reference else []
    runnable = [(s, i) for i, s in enumerate(plan.specs) if not s.skip_reason]
    runnable.sort(key=lambda pair: pair[0].name != plan.reference_row)  # the reference row first
    order += runnable
    for name in plan.ignored_args:
        console.print(f"note: --strategy-args for {name} ignored: it is not in --strategies", markup=False)
    for spec in (s for s in plan.specs if s.skip_reason):
        console.print(f"skip {spec.name}: {spec.skip_reason}", soft_wrap=True, markup=False)
    write_json(result, out)

    for number, (spec, index) in enumerate(order, start=1):
        is_reference = index is None or spec.name == plan.reference_row
        role = " (reference)" if is_reference and options.verify else ""
        processes = f"{spec.nproc} process{'es' if spec.nproc != 1 else ''}"
        console.print(
            f"[{number}/{len(order)}] {spec.name}{role}: {processes} → {out / 'runs' / spec.name}",
            soft_wrap=True,
            markup=False,
            style="bold",
        )
        with console.status(escape(f"running {spec.name} ({number}/{len(order)})…")):
            record = run_one(spec, plan.common_args, out, options.run_timeout_s)
            if options.verify and record.status == "ok":
                record.verify = verification(record, is_reference, result.reference_record, out, plan.rtol)
                if options.prune_models and not is_reference:
                    shutil.rmtree(out / record.run_dir / "model", ignore_errors=True)
        if index is None:
            result.reference_run = record
        else:
            rows[index] = record
        console.print(f"      {describe_record(record)}", highlight=False, soft_wrap=True, markup=False)
        write_json(result, out)

    if options.prune_models and result.reference_record is not None:
        shutil.rmtree(out / result.reference_record.run_dir / "model", ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / "logs").rmdir()  # every run's output has moved into its run directory
    result.complete = True
    write_json(result, out)
    return result


def bench_command(options: BenchOptions, console: Console | None = None) -> int:
    """`moectl bench`: plan (bad input raises UsageError), run, print the table, write json and plot."""
    if console is None:
        console = output_console()
    plan = plan_bench(options)
    result = run_bench(plan, console)
    payload = json.loads((options.out / "bench.json").read_text())
    print_table(payload, console)
    write_plot(payload, options.out / "bench.png", console)
    console.print(f"results: {options.out / 'bench.json'}")
    return result.exit_code
