"""`moectl bench`: speed and correctness of many strategies, one `moectl train` subprocess each.

Why subprocesses of the real CLI (`python -m moectl train ... --run-dir OUT/runs/<name>`): the
numbers are then those of the code path users run, a strategy that crashes, hangs or runs out of
memory takes only its own row down, and every run leaves an ordinary run directory behind.

Flow: everything the user typed is checked first (strategy names, `--strategy-args` keys, config
keys, `--out`), so bad input is one line and exit code 2 before anything runs. Then the reference
(with `--verify`) runs first, the other strategies after it, each one compared with the reference
through `moectl.compare.checkpoints.compare_checkpoints` as soon as it ends. `bench.json` is rewritten
atomically after every run, so a bench that is interrupted still leaves what it measured.

Degrees for `--nproc N`: each strategy names the flags that run it on N processes
(`Strategy.flags_for_world`: tp `--tp-size N`, mixed `--dp-size 2 --tp-size N/2`, ep the largest
`--ep-size` dividing both N and model.num_experts, ddp and fsdp none; `single` always runs on one
process); `--strategy-args` for a strategy replace them. A strategy whose degrees do not fit N or
the model (`ParallelDims.check`, or a rule of its own) is skipped with the rule it breaks.

`bench.json` (schema_version 1). Non-finite numbers are written as null. Paths are relative to the
directory that holds bench.json.

    schema_version   int    1
    complete         bool   false while runs are still pending
    exit_code        int    0 every run ok (and verified, with --verify); 1 otherwise (null until complete)
    created          str    ISO 8601 time the bench started
    moectl_version   str
    settings         object config (str|null: preset or YAML), nproc (int), steps (int),
                            warmup_steps (int), global_batch (int), micro_batch (int), seq_len (int),
                            lr (float), sets (list of str), device ("cpu"|"cuda"), dtype (str)
    verify           object enabled (bool), reference (str|null: strategy name), reference_why
                            (str|null), rtol (float|null), reference_run (a run object | null: the
                            reference when it is not one of the rows, else null)
    rows             list   one run object per requested strategy, in the order given

    run object:
    name             str    row name: the strategy name, a plugin file's stem, or a module's last part
    strategy         str    what was passed to --strategy
    nproc            int    processes asked for
    args             list   flags after the shared ones (default degrees, then --strategy-args)
    command          list   the full argv of the `moectl train` subprocess ([] when skipped)
    run_dir          str    its run directory (stdout.log, stderr.log of the subprocess inside)
    status           str    "pending" | "ok" | "failed" | "skipped"
    reason           str|null  why it failed or was skipped (the last error line of its stderr)
    exit_code        int|null  the subprocess's exit code (negative: killed by that signal)
    wall_s           float|null  seconds the subprocess ran, start-up and saving included
    world_size       int|null
    device           str|null  "cpu" or the GPU's name
    median_step_time_s, tokens_per_s, tokens_per_s_per_device   float|null  medians after warm-up
    mfu, mfu_seed    float|null  fractions (0.4 = 40 %); null when the device's peak is unknown
    peak_mem_gib     float|null  largest peak over the ranks (GPU: allocated; CPU: process RSS)
    final_loss       float|null
    loss_curve       list   {"step": int, "loss": float|null} per recorded step
    verify           object|null  null without --verify or when the run did not complete, else
                            status ("pass" | "fail" | "error" | "reference"), rel_err (float|null:
                            ‖A − B‖₂ / ‖B‖₂), rtol (float), reason (str|null), steps (int: the
                            steps after which the weights were compared), max_loss_diff
                            (float|null: largest |loss − reference loss| over common steps),
                            worst_tensor (str|null) and worst_tensor_rel_err (float|null): the
                            tensor with the largest relative error. Pass = rel_err ≤ rtol and, at
                            every step, |loss − reference loss| ≤ rtol · max(1, |reference loss|).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from moectl import __version__
from moectl.bench.report import describe_record, print_table, write_plot
from moectl.compare.checkpoints import compare_checkpoints
from moectl.config import RunConfig, apply_overrides, merge_overrides, parse_set_option, train_args_overrides
from moectl.errors import UsageError
from moectl.io.outputs import write_json_atomic
from moectl.model.sizing import count_params, estimate_memory_gib
from moectl.registry import available_strategies, build_strategy, get_strategy, option_owners
from moectl.run import runtime
from moectl.run.faults import last_error_line
from moectl.run.prepare import resolve
from moectl.strategy import Layout, Strategy

SCHEMA_VERSION = 1
REFERENCE_CHOICES = ("auto", "single", "fsdp")
#: `--reference auto` picks single when the estimated training footprint is at most this share of one
#: device's memory: the estimate leaves out the allocator's slack and the CUDA context.
SINGLE_FITS_FRACTION = 0.8
RTOL_FP32 = 1e-5
RTOL_BF16 = 1e-2
#: `--strategy-args` may not set these: the bench owns them.
RESERVED_FLAGS = ("--strategy", "--run-dir", "--config", "-c", "--dry-run")


@dataclass
class BenchOptions:
    """Everything `moectl bench` takes; None means the preset's value."""

    strategies: list[str]
    nproc: int
    out: Path
    config: str | None = None
    steps: int | None = None
    warmup: int | None = None
    global_batch: int | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    sets: list[str] = field(default_factory=list)
    strategy_args: str | None = None
    verify: bool = False
    reference: str = "auto"
    rtol: float | None = None
    run_timeout_s: float | None = None
    prune_models: bool = False


@dataclass
class RunSpec:
    """One `moectl train` subprocess to start (or a skip with its reason)."""

    name: str
    strategy: str
    nproc: int
    args: list[str]
    skip_reason: str | None = None


@dataclass
class RunRecord:
    """One row of bench.json; see the module docstring for each field."""

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
class BenchPlan:
    options: BenchOptions
    cfg: RunConfig
    common_args: list[str]
    specs: list[RunSpec]
    uses_gpu: bool
    reference: RunSpec | None = None  # the reference run when it is not one of the rows
    reference_name: str | None = None  # the strategy name of the reference
    reference_row: str | None = None  # the row that is the reference, when one is
    reference_why: str | None = None
    rtol: float | None = None
    ignored_args: list[str] = field(default_factory=list)  # --strategy-args names not benchmarked


# ---- checking the input ---------------------------------------------------------------------------
def row_name(entry: str) -> str:
    """A row (and run directory) name: a built-in's name, a .py file's stem, or a module's last part."""
    if entry.endswith(".py") or ".py:" in entry:
        return Path(entry.split(".py:")[0].removesuffix(".py") + ".py").stem
    if ":" in entry:
        return entry.split(":", 1)[0].rsplit(".", 1)[-1]
    return entry


def parse_strategy_list(text: str) -> list[str]:
    entries = [part.strip() for part in text.split(",") if part.strip()]
    if not entries:
        raise UsageError("--strategies is empty; give names separated by commas, e.g. single,ddp,tp")
    return entries


def parse_strategy_args(
    text: str | None, names: dict[str, str], known: list[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """`"ep:--ep-size 4;mixed:--dp-size 2 --tp-size 2"` -> ({row name: argv}, ignored names).

    `names` maps every accepted key (row names and the entries as typed) to its row name; the longest
    key that prefixes a part wins, so `pkg.mod:Class:--flag` works too. A part for a `known` strategy
    that is not benchmarked is ignored (scripts keep one --strategy-args while the list varies); any
    other name is a typo and an error.
    """
    parsed: dict[str, list[str]] = {}
    ignored: list[str] = []
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        key = next((k for k in sorted(names, key=len, reverse=True) if part.startswith(k + ":")), None)
        if key is None and part.split(":", 1)[0].strip() in known and ":" in part:
            ignored.append(part.split(":", 1)[0].strip())
            continue
        if key is None:
            raise UsageError(
                f"--strategy-args part {part!r} names no strategy of --strategies "
                f"({', '.join(dict.fromkeys(names.values()))}); write NAME:FLAGS, parts separated by ';'"
            )
        name = names[key]
        if name in parsed:
            raise UsageError(f"--strategy-args gives flags for {name} twice; put them in one part")
        try:
            argv = shlex.split(part[len(key) + 1 :])
        except ValueError as exc:
            raise UsageError(f"--strategy-args for {name}: {exc}; check the quoting") from None
        if reserved := [a for a in argv if a.split("=")[0] in RESERVED_FLAGS]:
            raise UsageError(
                f"--strategy-args for {name} sets {reserved[0]}, which the bench sets itself; drop it"
            )
        parsed[name] = argv
    return parsed, ignored


def degrees_for(
    strategy_cls: type[Strategy], nproc: int, user_flags: list[str], cfg: RunConfig
) -> tuple[int, list[str], str | None]:
    """(processes, degree flags, skip reason) of one strategy on `nproc` processes (one for a strategy
    that runs on one only): the flags of its preferred layout for that world (`Strategy.layouts`), or
    the user's flags instead, checked as `moectl train` checks them."""
    world = 1 if strategy_cls.one_process else nproc
    if user_flags:
        where = f"--strategy-args for {strategy_cls.name}"
        overrides = merge_overrides({"parallel": {"nproc": world}}, train_args_overrides(user_flags, where))
        run_cfg = apply_overrides(cfg, overrides)
        world, flags = run_cfg.parallel.nproc * run_cfg.parallel.nnodes, user_flags
    else:
        layouts = strategy_cls.layouts(world, cfg.model)
        layout = next((lay for lay in layouts if _worth_running(strategy_cls, lay, cfg)), Layout(world))
        run_cfg, flags = layout.apply(cfg), layout.args()
    try:
        build_strategy(run_cfg, world, strategy_cls)
    except UsageError as exc:
        return world, flags, str(exc)
    return world, flags, None


def _worth_running(strategy_cls: type[Strategy], layout: Layout, cfg: RunConfig) -> bool:
    """False for a layout that runs what another strategy runs (mixed with dp 1 is tp); a layout the
    model forbids is taken, and its rule becomes the row's skip reason."""
    try:
        return build_strategy(layout.apply(cfg), layout.world_size, strategy_cls).redundant() is None
    except UsageError:
        return True


def _shared_config(options: BenchOptions) -> RunConfig:
    """The config every run shares, resolved here so bad keys and values fail before anything runs."""
    flags = {
        "steps": options.steps,
        "global_batch": options.global_batch,
        "micro_batch": options.micro_batch,
        "seq_len": options.seq_len,
        "lr": options.lr,
        "timing_warmup_steps": options.warmup,
    }
    overrides = merge_overrides(
        parse_set_option(options.sets), {"train": {k: v for k, v in flags.items() if v is not None}}
    )
    cfg = resolve(options.config, overrides)
    if cfg.train.timing_warmup_steps >= cfg.train.steps:
        raise UsageError(
            f"--warmup {cfg.train.timing_warmup_steps} leaves none of the {cfg.train.steps} steps timed; "
            f"use --steps {cfg.train.timing_warmup_steps + 3} or a smaller --warmup"
        )
    return cfg


def _common_args(options: BenchOptions, cfg: RunConfig) -> list[str]:
    args: list[str] = ["--config", options.config] if options.config else []
    for flag, value in (
        ("--steps", options.steps),
        ("--global-batch", options.global_batch),
        ("--micro-batch", options.micro_batch),
        ("--seq-len", options.seq_len),
        ("--lr", options.lr),
    ):
        if value is not None:
            args += [flag, str(value)]
    for item in options.sets:
        args += ["--set", item]
    args += ["--set", f"train.timing_warmup_steps={cfg.train.timing_warmup_steps}"]
    if not options.verify:
        args += ["--set", "train.save_model=false"]  # nothing compares the weights: skip writing them
    return args


def gpu_memory_gib() -> float | None:
    """One GPU's memory, asked in a short-lived subprocess so the bench holds no CUDA context."""
    code = "import torch; print(torch.cuda.get_device_properties(0).total_memory)"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(done.stdout.strip().splitlines()[-1]) / 2**30
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def choose_reference(choice: str, cfg: RunConfig, uses_gpu: bool, available: list[str]) -> tuple[str, str]:
    """(reference strategy, why): `single` when the model fits one device comfortably, else `fsdp`."""
    if choice != "auto":
        name, why = choice, f"--reference {choice}"
    elif not uses_gpu:
        name, why = "single", "auto: CPU run, single always fits"
    else:
        param_bytes = runtime.training_dtype(cfg.train, True).itemsize
        need = estimate_memory_gib(cfg.model, cfg.train, count_params(cfg.model).total, param_bytes)
        have = gpu_memory_gib()
        if have is not None and need <= SINGLE_FITS_FRACTION * have:
            name, why = "single", f"auto: about {need:.1f} GiB fits one device's {have:.0f} GiB"
        else:
            known = f"one device's {have:.0f} GiB" if have is not None else "an unknown device memory"
            name, why = "fsdp", f"auto: about {need:.1f} GiB is too much for {known}"
    if name not in available:
        raise UsageError(
            f"the reference {name} ({why}) is not an available strategy ({', '.join(available)}); "
            "pick another with --reference"
        )
    return name, why


def plan_bench(options: BenchOptions) -> BenchPlan:
    """Check every input and work out every run; raises UsageError before anything is written."""
    if options.nproc < 1:
        raise UsageError(f"--nproc must be 1 or more, got {options.nproc}")
    if options.reference not in REFERENCE_CHOICES:
        raise UsageError(
            f"--reference must be one of {', '.join(REFERENCE_CHOICES)}, got {options.reference!r}"
        )
    if options.rtol is not None and not options.rtol > 0:
        raise UsageError(f"--rtol must be a number above 0, got {options.rtol}")
    if options.run_timeout_s is not None and not options.run_timeout_s > 0:
        raise UsageError(f"--run-timeout must be above 0 seconds, got {options.run_timeout_s}")
    out = options.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; pick another directory")

    entries = options.strategies
    names: dict[str, str] = {}
    classes = {}
    for entry in entries:
        classes[entry] = get_strategy(entry)  # UsageError for an unknown name or a broken plugin
        name = row_name(entry)
        if name in names.values():
            raise UsageError(f"--strategies names {name} twice; give each strategy once")
        names[name] = name
        names[entry] = name
    per_strategy, ignored = parse_strategy_args(options.strategy_args, names, available_strategies())

    cfg = _shared_config(options)
    _check_shared_options(cfg, list(classes.values()))
    uses_gpu = runtime.uses_gpu(cfg.train)
    specs = []
    for entry in entries:
        name = row_name(entry)
        nproc, flags, skip = degrees_for(classes[entry], options.nproc, per_strategy.get(name, []), cfg)
        specs.append(RunSpec(name, entry, nproc, ["--nproc", str(nproc), *flags], skip))

    plan = BenchPlan(options, cfg, _common_args(options, cfg), specs, uses_gpu, ignored_args=ignored)
    if options.verify:
        if not cfg.train.save_model:
            raise UsageError("--verify compares saved weights; drop --set train.save_model=false")
        reference, plan.reference_why = choose_reference(
            options.reference, cfg, uses_gpu, available_strategies()
        )
        plan.reference_name = reference
        plan.rtol = options.rtol or (RTOL_FP32 if _fp32(cfg, uses_gpu) else RTOL_BF16)
        in_rows = next((s for s in specs if s.strategy == reference and s.skip_reason is None), None)
        if in_rows is not None:
            plan.reference_row = in_rows.name
        else:
            nproc, flags, _ = degrees_for(get_strategy(reference), options.nproc, [], cfg)
            name = f"reference-{reference}"
            if name in names.values():
                raise UsageError(f"a row is named {name}, which the reference run needs; rename the plugin")
            plan.reference = RunSpec(name, reference, nproc, ["--nproc", str(nproc), *flags])
        _check_shared_options(cfg, [get_strategy(reference)])
    return plan


def _check_shared_options(cfg: RunConfig, strategy_classes: list[type[Strategy]]) -> None:
    """A strategy option in the shared `--set`s must belong to every strategy that runs."""
    for key in cfg.parallel.options:
        others = [cls.name for cls in strategy_classes if key not in cls.Options.keys()]
        if others:
            owner = (option_owners(key) or ["NAME"])[0]
            raise UsageError(
                f"--set parallel.{key} is not an option of {', '.join(others)}; give it to its strategy "
                f"alone: --strategy-args '{owner}:--set parallel.{key}=...'"
            )


def _fp32(cfg: RunConfig, uses_gpu: bool) -> bool:
    return runtime.training_dtype(cfg.train, uses_gpu) == torch.float32


# ---- running ----------------------------------------------------------------------------------------


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


def steps_done(record: RunRecord) -> int:
    """The steps a finished run's final weights come after (its last recorded step)."""
    return record.loss_curve[-1]["step"] + 1 if record.loss_curve else 0


def loss_tolerance(rtol: float, reference_loss: float) -> float:
    """How far a step's loss may be from the reference's: `rtol` relative to the loss, absolute below 1."""
    return rtol * max(1.0, abs(reference_loss))


def _loss_mismatch(record: RunRecord, reference: RunRecord, rtol: float) -> tuple[float | None, str | None]:
    """(largest |loss − reference loss| over the steps, why the curves do not match or None)."""
    losses = {p["step"]: p["loss"] for p in reference.loss_curve}
    diffs, worst = [], None
    for point in record.loss_curve:
        ref = losses.get(point["step"])
        if ref is None or point["loss"] is None:
            continue
        diff = abs(point["loss"] - ref)
        diffs.append(diff)
        if not diff <= loss_tolerance(rtol, ref) and worst is None:
            worst = (
                f"loss {point['loss']:.6g} at step {point['step'] + 1} differs from the reference's "
                f"{ref:.6g} by {diff:.2e} (tolerance {loss_tolerance(rtol, ref):.1e})"
            )
    steps, ref_steps = [p["step"] for p in record.loss_curve], sorted(losses)
    if worst is None and steps != ref_steps:
        worst = f"the run recorded {len(steps)} steps, the reference {len(ref_steps)}"
    return max(diffs, default=None), worst


def verify_against(record: RunRecord, reference: RunRecord, out: Path, rtol: float) -> dict[str, Any]:
    """Compare a run's final weights and its loss at every step with the reference's: both must match."""
    max_loss_diff, loss_failure = _loss_mismatch(record, reference, rtol)
    result: dict[str, Any] = {
        "rtol": rtol,
        "steps": steps_done(record),
        "max_loss_diff": max_loss_diff,
        "worst_tensor": None,
        "worst_tensor_rel_err": None,
    }
    try:
        report = compare_checkpoints(
            out / record.run_dir / "model", out / reference.run_dir / "model", rtol=rtol, progress=False
        )
    except UsageError as exc:
        return {**result, "status": "error", "rel_err": None, "reason": str(exc)}
    if report.tensors:
        result["worst_tensor"], result["worst_tensor_rel_err"] = (
            report.tensors[0].name,
            report.tensors[0].rel_err,
        )
    failures = [*report.failures, *([loss_failure] if loss_failure else [])]
    return {
        **result,
        "status": "pass" if not failures else "fail",
        "rel_err": report.global_rel_err,
        "reason": "; ".join(failures) or None,
    }


# ---- the whole bench --------------------------------------------------------------------------------
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
        return _json_safe(
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
                    "dtype": "float32" if _fp32(self.plan.cfg, self.plan.uses_gpu) else "bfloat16",
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


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null: bench.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


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
    _write_json(result, out)

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
                record.verify = _verification(record, is_reference, result)
                if options.prune_models and not is_reference:
                    shutil.rmtree(out / record.run_dir / "model", ignore_errors=True)
        if index is None:
            result.reference_run = record
        else:
            rows[index] = record
        console.print(f"      {describe_record(record)}", highlight=False, soft_wrap=True, markup=False)
        _write_json(result, out)

    if options.prune_models and result.reference_record is not None:
        shutil.rmtree(out / result.reference_record.run_dir / "model", ignore_errors=True)
    with contextlib.suppress(OSError):
        (out / "logs").rmdir()  # every run's output has moved into its run directory
    result.complete = True
    _write_json(result, out)
    return result


def _verification(record: RunRecord, is_reference: bool, result: BenchResult) -> dict[str, Any]:
    rtol = result.plan.rtol
    if is_reference:
        return {
            "status": "reference",
            "rel_err": 0.0,
            "rtol": rtol,
            "reason": None,
            "steps": steps_done(record),
            "max_loss_diff": 0.0,
            "worst_tensor": None,
            "worst_tensor_rel_err": None,
        }
    reference = result.reference_record
    if reference is None or reference.status != "ok":
        why = reference.reason if reference is not None else "it did not run"
        return {
            "status": "error",
            "rel_err": None,
            "rtol": rtol,
            "reason": f"the reference failed: {why}",
            "steps": steps_done(record),
            "max_loss_diff": None,
            "worst_tensor": None,
            "worst_tensor_rel_err": None,
        }
    return verify_against(record, reference, result.plan.options.out, rtol)


def _write_json(result: BenchResult, out: Path) -> None:
    write_json_atomic(out / "bench.json", result.to_json())


def bench_command(options: BenchOptions, console: Console | None = None) -> int:
    """`moectl bench`: plan (bad input raises UsageError), run, print the table, write json and plot."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for the table, never 80 columns
            console.width = max(console.width, 150)
    plan = plan_bench(options)
    result = run_bench(plan, console)
    payload = json.loads((options.out / "bench.json").read_text())
    print_table(payload, console)
    write_plot(payload, options.out / "bench.png", console)
    console.print(f"results: {options.out / 'bench.json'}")
    return result.exit_code


def default_strategies() -> list[str]:
    """Every registered strategy (built-ins and plugins), in registration order, `single` first."""
    found = available_strategies()
    return sorted(found, key=lambda name: name != "single")


def default_nproc() -> int:
    """Every visible GPU, or 2 processes on the CPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2
