"""One `moectl train` subprocess of a bench: started in its own session (a timeout or Ctrl-C ends it and
its workers), its output moved into its run directory, what it measured read back from summary.json and
metrics.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from moectl.bench.record import RunRecord
from moectl.bench.run_list import RunSpec
from moectl.run.faults import last_error_line


def _stop_group(process: subprocess.Popen) -> None:
    """End the run's process group (the train CLI and its workers): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(spec: RunSpec, common_args: list[str], out: Path, timeout_s: float | None) -> RunRecord:
    """Start `moectl train` for one strategy, wait, and read what it measured."""
    run_dir = out / "runs" / spec.name
    command = [
        sys.executable,
        "-m",
        "moectl",
        "train",
        "--strategy",
        spec.strategy,
        "--run-dir",
        str(run_dir),
        *common_args,
        *spec.args,
    ]
    record = RunRecord(spec.name, spec.strategy, spec.nproc, spec.args, command, f"runs/{spec.name}")
    # train refuses a non-empty run directory, so output goes to logs/ and moves in afterwards.
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_dir / f"{spec.name}.stdout.log", log_dir / f"{spec.name}.stderr.log"
    started = time.perf_counter()
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        # Its own session, so a timeout or Ctrl-C ends the whole group, workers included.
        process = subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            record.exit_code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            record.exit_code = process.returncode
            record.reason = f"timed out after {timeout_s:g} s (--run-timeout)"
        except BaseException:  # Ctrl-C: leave no workers behind
            _stop_group(process)
            raise
    record.wall_s = time.perf_counter() - started
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(stdout_path, run_dir / "stdout.log")
    shutil.move(stderr_path, run_dir / "stderr.log")
    if record.exit_code == 0 and record.reason is None:
        _read_results(record, run_dir)
    if record.reason is None and record.exit_code != 0:
        line = last_error_line((run_dir / "stderr.log").read_text(errors="replace")).removeprefix("error: ")
        if record.exit_code is not None and record.exit_code < 0:
            line = f"killed by {signal.Signals(-record.exit_code).name}" + (f": {line}" if line else "")
        record.reason = line or f"exited with code {record.exit_code}; see {run_dir / 'stderr.log'}"
    record.status = "ok" if record.reason is None else "failed"
    return record


def _read_results(record: RunRecord, run_dir: Path) -> None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        record.reason = f"finished without a readable summary.json ({exc})"
        return
    for key in (
        "world_size",
        "device",
        "median_step_time_s",
        "tokens_per_s",
        "tokens_per_s_per_device",
        "mfu",
        "mfu_seed",
        "peak_mem_gib",
        "final_loss",
    ):
        setattr(record, key, summary.get(key))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    record.loss_curve = [{"step": r["step"], "loss": r["loss"]} for r in map(json.loads, lines)]
