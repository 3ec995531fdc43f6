"""`moectl bench`, before anything runs: every input checked (strategy names, `--strategy-args` keys and
flags, config keys, `--out`), so bad input is one line and exit code 2, and the list of `moectl train`
runs worked out, each strategy with its degrees for `--nproc`.

Degrees for `--nproc N`: each strategy's preferred layout for N processes (`Strategy.layouts`; a
strategy that runs on one process only runs on one), or the flags `--strategy-args` gives it instead,
checked as `moectl train` checks them; a strategy whose degrees do not fit N or the model is skipped
with the rule it breaks.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moectl.config import (
    MAX_PROCESSES_PER_NODE,
    MAX_TIMEOUT_S,
    RunConfig,
    apply_overrides,
    merge_overrides,
    parse_set_option,
    train_args_overrides,
)
from moectl.errors import UsageError
from moectl.io.outputs import check_output_dir
from moectl.registry import available_strategies, build_strategy, get_strategy, option_owners, short_name
from moectl.run import runtime
from moectl.run.prepare import memory_estimate_gib, resolve
from moectl.strategy import Layout, Strategy

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
        # single on one GPU in the run's precision: under mixed fp32 weights and state, bf16 copies
        single = build_strategy(RunConfig(model=cfg.model, train=cfg.train), 1, get_strategy("single"))
        cost = single.step_cost(cfg.train, 1, runtime.precision(cfg.train, True))
        need = memory_estimate_gib(cfg, single, cost, single.micro_batches(cfg.train), on_gpu=True)
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
    if not 1 <= options.nproc <= MAX_PROCESSES_PER_NODE:
        raise UsageError(f"--nproc must be from 1 to {MAX_PROCESSES_PER_NODE:,}, got {options.nproc}")
    if options.reference not in REFERENCE_CHOICES:
        raise UsageError(
            f"--reference must be one of {', '.join(REFERENCE_CHOICES)}, got {options.reference!r}"
        )
    if options.rtol is not None and not 0 < options.rtol < math.inf:
        raise UsageError(f"--rtol must be a finite number above 0, got {options.rtol}")
    if options.run_timeout_s is not None and not 0 < options.run_timeout_s <= MAX_TIMEOUT_S:
        raise UsageError(
            f"--run-timeout must be above 0 and at most {MAX_TIMEOUT_S:,} seconds (a week), got {options.run_timeout_s}"
        )
    out = options.out
    check_output_dir(out, "--out")

    entries = options.strategies
    names: dict[str, str] = {}
    classes = {}
    for entry in entries:
        classes[entry] = get_strategy(entry)  # UsageError for an unknown name or a broken plugin
        name = short_name(entry)
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
        name = short_name(entry)
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
        plan.rtol = options.rtol or (RTOL_FP32 if fp32(cfg, uses_gpu) else RTOL_BF16)
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


def fp32(cfg: RunConfig, uses_gpu: bool) -> bool:
    return runtime.training_dtype(cfg.train, uses_gpu) == torch.float32


def default_strategies() -> list[str]:
    """Every registered strategy (built-ins and plugins), in registration order, `single` first."""
    found = available_strategies()
    return sorted(found, key=lambda name: name != "single")


def default_nproc() -> int:
    """Every visible GPU, or 2 processes on the CPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2
