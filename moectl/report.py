"""Per-step reporting on rank 0: metrics.jsonl, and a rich progress bar (plain lines off a terminal)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch.profiler as tp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moectl.metrics import format_mfu


class StepReporter:
    def __init__(self, run_dir: Path | None, total_steps: int, enabled: bool, label: str):
        self.enabled = enabled
        self.metrics_file = (run_dir / "metrics.jsonl").open("a") if (enabled and run_dir) else None
        self.console = Console(stderr=False)
        self.interactive = enabled and sys.stdout.isatty()
        self.progress: Progress | None = None
        if self.interactive:
            self.progress = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(label, total=total_steps, stats="")
            self.progress.start()

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.metrics_file:
            # One write per line: a reader (or a crash) never sees half a record.
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        stats = (
            f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s | "
            f"MFU {format_mfu(record['mfu'])} | mem {record['mem_gib']:.2f} GiB"
            + (" | warm-up" if record["warmup"] else "")
        )
        if self.progress:
            self.progress.update(self.task, completed=record["step"] + 1, stats=stats)
        else:
            print(f"step {record['step'] + 1}: {stats}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(text)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.metrics_file:
            self.metrics_file.close()


class StepProfiler:
    """torch.profiler over `train.profile_steps` steps right after warm-up (rank 0 only).

    Writes RUN_DIR/profile.txt (operators and kernels by device time) and RUN_DIR/profile_trace.json
    (a Chrome/Perfetto trace): where the milliseconds of a step go, per kernel.
    """

    def __init__(self, run_dir: Path | None, train, enabled: bool, device):
        self.run_dir = run_dir
        self.active = enabled and run_dir is not None and train.profile_steps > 0
        self.profiler = None
        if self.active:
            activities = [tp.ProfilerActivity.CPU] + (
                [tp.ProfilerActivity.CUDA] if device.type == "cuda" else []
            )
            schedule = tp.schedule(
                wait=max(train.timing_warmup_steps - 1, 0), warmup=1, active=train.profile_steps, repeat=1
            )
            self.profiler = tp.profile(activities=activities, schedule=schedule, on_trace_ready=self._write)
            self.sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def _write(self, profiler) -> None:
        table = profiler.key_averages().table(sort_by=self.sort_key, row_limit=60, max_name_column_width=70)
        (self.run_dir / "profile.txt").write_text(table)
        profiler.export_chrome_trace(str(self.run_dir / "profile_trace.json"))

    def __enter__(self) -> StepProfiler:
        if self.profiler:
            self.profiler.__enter__()
        return self

    def step(self) -> None:
        if self.profiler:
            self.profiler.step()

    def __exit__(self, *exc_info) -> None:
        if self.profiler:
            self.profiler.__exit__(*exc_info)
