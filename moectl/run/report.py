"""What a run tells: per-step lines (metrics.jsonl, and a rich progress bar with ETA on a terminal or
plain lines otherwise) and the summary block at the end.

Where the console is: a process's stdout, except in a launched worker, whose stdout is its rank log;
global rank 0 of such a run is given the launcher's console (`set_console_stream`) and writes its
progress there, and plain step lines into its log.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import torch.profiler as tp
from rich.console import Console, RenderableType
from rich.progress import Progress, ProgressBar
from rich.table import Table
from rich.text import Text

from moectl.model.sizing import format_count, format_mfu
from moectl.tables import print_rows

_console_stream: TextIO | None = None

#: how a step left out of the timing is labelled (the first `train.timing_warmup_steps` of every session,
#: a resumed one included: allocator, caches and compilation warm up again after a restart)
WARMUP_LABEL = "warm-up (not timed)"


def set_console_stream(stream: TextIO) -> None:
    """Rank 0 of a launched run: where its progress goes (its stdout is its rank log)."""
    global _console_stream
    _console_stream = stream


def console_stream() -> TextIO:
    return _console_stream or sys.stdout


def step_line(record: dict[str, Any], world_size: int) -> str:
    """One step in words: tokens/s per device always, the total beside it when there are several."""
    speed = f"{record['tokens_per_s_per_device']:,.0f} tok/s/device"
    if world_size > 1:
        speed += f" ({record['tokens_per_s']:,.0f} total)"
    return (
        f"loss {record['loss']:.4f} | {speed} | MFU {format_mfu(record['mfu'])} | "
        f"mem {record['mem_gib']:.2f} GiB"
        + (
            f" | val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:,.2f})"
            if "val_loss" in record
            else ""
        )
        + (f" | {WARMUP_LABEL}" if record["warmup"] else "")
    )


#: the progress bar's width when the line has room for it (and the least it is drawn with)
BAR_WIDTH, MIN_BAR_WIDTH = 30, 10


def progress_fields(
    record: dict[str, Any] | None, world_size: int, done: int, total: int, eta_s: float | None, label: str
) -> list[tuple[str, str]]:
    """The progress line's fields as (kind, text), in the order shown; "bar" marks the bar's place."""
    eta = "-:--:--" if eta_s is None else str(datetime.timedelta(seconds=max(0, round(eta_s))))
    fields = [("label", label), ("bar", ""), ("count", f"{done}/{total}")]
    if record is not None:
        fields += [
            ("loss", f"loss {record['loss']:.4f}"),
            ("speed", f"{record['tokens_per_s_per_device']:,.0f} tok/s/device"),
        ]
        if world_size > 1:
            fields.append(("total", f"({record['tokens_per_s']:,.0f} total)"))
        fields += [("mfu", f"MFU {format_mfu(record['mfu'])}"), ("mem", f"mem {record['mem_gib']:.2f} GiB")]
        if record["warmup"]:
            fields.append(("warmup", "warm-up"))
    return fields + [("eta", f"ETA {eta}")]


#: what goes first when the line is too narrow for everything (the count and the ETA always stay)
DROP_ORDER = ("total", "label", "mem", "bar", "mfu", "warmup", "speed", "loss")
#: the figures between the count and the ETA, one "·" between each two
STATS = ("loss", "speed", "total", "mfu", "mem", "warmup")


def _joined(kept: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The kept fields with the separator before every figure but the first (the total speed belongs
    to the speed before it)."""
    out, figures = [], 0
    for kind, text in kept:
        if kind in STATS and kind != "total":
            text = ("· " if figures else "") + text
            figures += 1
        out.append((kind, text))
    return out


def fit_progress_fields(fields: list[tuple[str, str]], width: int) -> tuple[list[tuple[str, str]], int]:
    """The fields (separators included) that fit in `width` columns, dropping the least useful first
    (DROP_ORDER), and the bar's width (0: no bar). Cells are one space apart."""
    kept = list(fields)

    def needed(bar_width: int) -> int:
        texts = [bar_width if kind == "bar" else len(text) for kind, text in _joined(kept)]
        return sum(texts) + len(texts) - 1

    for kind in (None, *DROP_ORDER):
        kept = [field for field in kept if field[0] != kind]
        has_bar = any(k == "bar" for k, _ in kept)
        if not has_bar and needed(0) <= width:
            return _joined(kept), 0
        if has_bar and needed(MIN_BAR_WIDTH) <= width:
            return _joined(kept), min(BAR_WIDTH, width - needed(0))
    return _joined(kept), 0


def progress_line(fields: list[tuple[str, str]], width: int, done: int, total: int) -> RenderableType:
    """One line of at most `width` columns: the fields that fit, with the bar where there is room."""
    kept, bar_width = fit_progress_fields(fields, width)
    line = Table.grid(padding=(0, 1))
    cells: list[RenderableType] = []
    for kind, text in kept:
        line.add_column(no_wrap=True)
        if kind == "bar":
            cells.append(ProgressBar(total=total, completed=done, width=bar_width))
        else:
            cells.append(Text(text, style="bold" if kind == "label" else ""))
    line.add_row(*cells)
    return line


class _StepProgress(Progress):
    """rich's Progress (its refresh and its time estimate), drawn as one line that fits the terminal."""

    def __init__(self, label: str, world_size: int, console: Console):
        super().__init__(console=console)
        self.label, self.world_size, self.record = label, world_size, None

    def get_renderables(self):
        for task in self.tasks:
            done, total = int(task.completed), int(task.total or 0)
            eta = 0.0 if task.finished else task.time_remaining
            fields = progress_fields(self.record, self.world_size, done, total, eta, self.label)
            yield progress_line(fields, self.console.width, done, total)


class StepReporter:
    def __init__(
        self,
        run_dir: Path | None,
        total_steps: int,
        enabled: bool,
        label: str,
        world_size: int = 1,
        steps_done: int = 0,
    ):
        """`steps_done`: steps a resumed run has behind it (where its progress bar starts)."""
        self.enabled = enabled
        self.world_size = world_size
        self.metrics_file = (run_dir / "metrics.jsonl").open("a") if (enabled and run_dir) else None
        stream = console_stream()
        self.console = Console(file=stream, stderr=False)
        # A launched rank 0 also keeps plain lines in its rank log (its stdout).
        self.log = sys.stdout if enabled and stream is not sys.stdout else None
        self.interactive = enabled and self.console.is_terminal
        self.progress: _StepProgress | None = None
        if self.interactive:
            self.progress = _StepProgress(label, world_size, self.console)
            self.task = self.progress.add_task(label, total=total_steps, completed=steps_done)
            self.progress.start()

    def _plain(self, text: str) -> None:
        for stream in (None if self.progress else self.console.file, self.log):
            if stream is not None:
                print(text, file=stream, flush=True)

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.metrics_file:
            # One write per line: a reader (or a crash) never sees half a record.
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.progress:
            self.progress.record = record
            self.progress.update(self.task, completed=record["step"])
        self._plain(f"step {record['step']}: {step_line(record, self.world_size)}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress:
            self.progress.console.print(text, markup=False, highlight=False)
        self._plain(text)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.metrics_file:
            self.metrics_file.close()


def summary_lines(run_dir: Path) -> list[tuple[str, str]]:
    """The end of a run as (what, value) rows, from its summary.json and config.yaml; [] when the
    summary is not in this directory (another node of a multi-node run wrote it)."""
    from moectl.config import build_config
    from moectl.model.sizing import count_params

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = build_config(str(run_dir / "config.yaml"))
    except (OSError, ValueError):
        return []
    m = cfg.model
    counts = count_params(m)
    degrees = summary.get("degrees") or {}
    world = summary["world_size"]
    layout = " × ".join(f"{axis} {degrees[axis]}" for axis in ("dp", "tp", "ep") if degrees.get(axis, 1) > 1)
    processes = f"{world} process{'es' if world != 1 else ''}"
    if summary.get("median_step_time_s") is None:
        speed = f"not measured: {summary.get('not_timed') or 'no step was timed'}"
        mfu = "n/a (no step was timed)"
    else:
        speed = f"{summary['tokens_per_s_per_device']:,.0f} tokens/s per device (median"
        speed += f"; {summary['tokens_per_s']:,.0f} in total)" if world > 1 else ")"
        speed += f", {summary['median_step_time_s'] * 1e3:,.1f} ms per step"
        mfu = "n/a (the device's peak FLOP/s is unknown)"
    if summary.get("mfu") is not None:
        mfu = f"{format_mfu(summary['mfu'])} (seed formula {format_mfu(summary['mfu_seed'])})"
    losses = summary.get("losses") or []
    loss = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "no step finished"
    if losses and not all(math.isfinite(x) for x in losses):
        loss += " (non-finite values)"
    memory_kind = "allocated by torch" if summary.get("device", "cpu") != "cpu" else "process RSS"
    rows = [
        (
            "model",
            f"Qwen3-MoE, {m.num_layers} layers, {m.num_experts} experts (top-{m.top_k}): "
            f"{format_count(counts.total)} parameters, {format_count(counts.active)} active per token"
            + (f", from {m.path}" if m.path else ""),
        ),
        ("strategy", f"{summary['strategy']} on {processes}" + (f" ({layout})" if layout else "")),
        ("device", summary.get("device", "cpu")),
        ("precision", _precision_line(summary.get("precision"))),
        (
            "steps",
            f"{summary['steps']}; the first {summary['timing_warmup_steps']} of each session not timed (warm-up)",
        ),
        ("speed", speed),
        ("MFU", mfu),
        ("peak memory", f"{summary['peak_mem_gib']:.2f} GiB on the busiest rank ({memory_kind})"),
        ("loss", loss),
    ]
    if summary.get("final_val_loss") is not None:
        rows.append(
            (
                "validation",
                f"loss {summary['final_val_loss']:.4f}, perplexity {summary['final_val_ppl']:,.2f}",
            )
        )
    model_dir = run_dir / "model"
    rows.append(
        ("model dir", str(model_dir) if model_dir.is_dir() else "not written (train.save_model=false)")
    )
    plots = sorted(run_dir.glob("*.png"))
    if plots:
        rows.append(("plots", ", ".join(str(plot) for plot in plots)))
    rows.append(("metrics", f"{run_dir / 'metrics.jsonl'}, {run_dir / 'summary.json'}"))
    return rows


def _precision_line(name: str | None) -> str:
    """train.precision as run, in words (summary.json's `precision`; older summaries have none)."""
    return {
        "mixed": "mixed: fp32 weights, gradients and optimizer state, bf16 compute",
        "bf16": "bf16: weights, gradients, optimizer state and compute",
        "fp32": "fp32: weights, gradients, optimizer state and compute",
    }.get(name, "not recorded")


def print_run_summary(run_dir: Path, console: Console) -> None:
    """The summary block at the end of `moectl train`."""
    rows = summary_lines(run_dir)
    console.print(
        f"done: run directory {run_dir}", style="green", markup=False, highlight=False, soft_wrap=True
    )
    print_rows(console, rows)


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
