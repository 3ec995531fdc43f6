"""bench.json: one `RunRecord` per run and the whole bench's `BenchResult`, rewritten atomically after
every run. The schema, key by key, is in the README ("moectl bench"); non-finite numbers are written as
null, paths are relative to the directory that holds bench.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moectl import __version__
from moectl.bench.run_list import BenchPlan
from moectl.io.outputs import write_json_atomic
from moectl.run import runtime

SCHEMA_VERSION = 2


@dataclass
class RunRecord:
    """One row of bench.json (README, "moectl bench": a run object)."""

    name: str
    strategy: str
    nproc: int
    args: list[str]
    command: list[str] = field(default_factory=list)
    run_dir: str = ""
    status: str = "pending"
    reason: str | None = None
    exit_code: int | None = None
    wall_s: float | None = None
    world_size: int | None = None
    device: str | None = None
    median_step_time_s: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None
    mfu: float | None = None
    mfu_seed: float | None = None
    peak_mem_gib: float | None = None
    final_loss: float | None = None
    loss_curve: list[dict[str, Any]] = field(default_factory=list)
    verify: dict[str, Any] | None = None


@dataclass
class BenchResult:
    plan: BenchPlan
    rows: list[RunRecord]
    reference_run: RunRecord | None
    created: str
    complete: bool = False

    @property
    def reference_record(self) -> RunRecord | None:
        if self.plan.reference_row:
            return next(r for r in self.rows if r.name == self.plan.reference_row)
        return self.reference_run

    @property
    def exit_code(self) -> int:
        """0 when every run that was not skipped ran (and, with --verify, matched the reference)."""
        ran = [r for r in self.rows if r.status != "skipped"]
        if any(r.status != "ok" for r in ran):
            return 1
        if self.plan.options.verify:
            if self.reference_record is None or self.reference_record.status != "ok":
                return 1
            if any((r.verify or {}).get("status") not in ("pass", "reference") for r in ran):
                return 1
        return 0

    def to_json(self) -> dict[str, Any]:
        train = self.plan.cfg.train
        options = self.plan.options
        return json_safe(
            {
                "schema_version": SCHEMA_VERSION,
                "complete": self.complete,
                "exit_code": self.exit_code if self.complete else None,
                "created": self.created,
                "moectl_version": __version__,
                "settings": {
                    "config": options.config,
                    "nproc": options.nproc,
                    "steps": train.steps,
                    "warmup_steps": train.timing_warmup_steps,
                    "global_batch": train.global_batch,
                    "micro_batch": train.micro_batch,
                    "seq_len": train.seq_len,
                    "lr": train.lr,
                    "sets": list(options.sets),
                    "device": "cuda" if self.plan.uses_gpu else "cpu",
                    "precision": runtime.precision(train, self.plan.uses_gpu).name,
                },
                "verify": {
                    "enabled": options.verify,
                    "reference": self.plan.reference_name,
                    "reference_why": self.plan.reference_why,
                    "rtol": self.plan.rtol,
                    "reference_run": asdict(self.reference_run) if self.reference_run else None,
                },
                "rows": [asdict(r) for r in self.rows],
            }
        )


def json_safe(value: Any) -> Any:
    """Non-finite floats become null: bench.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json(result: BenchResult, out: Path) -> None:
    write_json_atomic(out / "bench.json", result.to_json())
