"""Per-step reporting on rank 0: metrics.jsonl, and a rich progress bar (plain lines off a terminal)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

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
