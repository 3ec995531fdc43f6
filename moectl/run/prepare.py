"""`moectl train` as a library function: resolve and check everything, then run or launch.

Every check that can fail on user input runs here (`prepare`), before the run directory exists, so
bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from moectl.config import PARALLEL_KEYS, DataConfig, ParallelConfig, RunConfig, build_config, merge_overrides
from moectl.data.sources import check_data
from moectl.errors import UsageError
from moectl.io.checkpoint import CheckpointInfo, latest_checkpoint
from moectl.io.paths import require_directory
from moectl.model.build import model_config_from_hf_dir
from moectl.model.sizing import (
    count_params,
    estimate_memory_gib,
    flops_per_token,
    format_count,
    seed_flops_per_token,
)
from moectl.parallel.cost import StepCost
from moectl.registry import build_strategy, drop_defaults_of_others
from moectl.run import runtime
from moectl.run.preflight import verify_checkpoint
from moectl.run.slurm import default_run_dir as slurm_run_dir
from moectl.run.slurm import slurm_layout
from moectl.run.tensorboard_log import check_available as check_tensorboard_available
from moectl.run.wandb_log import check as check_wandb
from moectl.strategy import Strategy
from moectl.tables import print_rows


@dataclass
class PreparedRun:
    cfg: RunConfig
    strategy: Strategy
    world_size: int
    nproc_per_node: int
    num_micro_batches: int
    resume_from: CheckpointInfo | None = None


def resolve(config: str | None, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    cfg = build_config(config, overrides)
    if cfg.model.path:
        # Through build_config again, so config.json values get the same type and range checks.
        hf_model = asdict(model_config_from_hf_dir(Path(cfg.model.path)))
        cfg = build_config(config, merge_overrides(overrides, {"model": hf_model}))
    return cfg


# A resume may change how the run is laid out, never what it computes: these keys and the strategy's
# own options (`parallel.<key>` of its `Options`).
LAYOUT_KEYS = ("nproc", "dp_size", "tp_size", "ep_size", "nnodes", "node_rank", "rdzv_endpoint")
FIXED_ON_RESUME = {
    "model": None,  # every key
    "data": tuple(key for key in asdict(DataConfig()) if key not in ("cache_dir", "num_proc")),
    "train": ("seed", "global_batch", "seq_len", "optimizer", "momentum"),
}


def resolve_resume(
    run_dir: Path, overrides: dict[str, dict[str, Any]], from_environment: frozenset[str] = frozenset()
) -> tuple[RunConfig, CheckpointInfo]:
    """The saved config.yaml of `run_dir` with the new flags on top, and the checkpoint to continue from.

    Any parallel flag replaces the saved layout as a whole (the saved strategy stays unless
    --strategy is given): `--resume R --nproc 4` means "ddp on 4", not "ddp on 4 with the old
    dp_size", and the saved strategy's options go too. Keys that define the computation (model, data,
    seed, batch shape, optimizer kind) cannot change: the checkpoint would not fit them. Parallel keys
    in `from_environment` (SLURM's nodes and rendezvous) update the saved layout without replacing it.
    """
    config_file = run_dir / "config.yaml"
    require_directory(run_dir, "--resume", "give the run directory to continue")
    if not config_file.is_file():
        raise UsageError(f"--resume {run_dir} is not a moectl run directory (no config.yaml)")
    info = latest_checkpoint(run_dir)
    if info is None:
        raise UsageError(
            f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}; "
            "runs write them with --checkpoint-every N"
        )
    saved = build_config(str(config_file))
    given = overrides.get("parallel", {})
    new_layout = bool(set(given) - {"timeout_s"} - from_environment)
    if new_layout:
        defaults = asdict(ParallelConfig())
        fresh_layout = {key: defaults[key] for key in LAYOUT_KEYS}
        overrides = {**overrides, "parallel": {**fresh_layout, **given}}
    cfg = build_config(str(config_file), overrides)
    if new_layout:
        cfg.parallel.options = {key: value for key, value in given.items() if key not in PARALLEL_KEYS}
    else:
        cfg.parallel.options = drop_defaults_of_others(cfg.parallel.strategy, cfg.parallel.options)
    for section, keys in FIXED_ON_RESUME.items():
        old, new = asdict(getattr(saved, section)), asdict(getattr(cfg, section))
        for key in keys or old:
            if old[key] != new[key]:
                raise UsageError(
                    f"--resume cannot change {section}.{key} (saved {old[key]!r}, given {new[key]!r}); "
                    "start a new run instead"
                )
    cfg.run_dir = str(run_dir)
    verify_checkpoint(info, cfg)
    if info.step > cfg.train.steps:
        raise UsageError(
            f"{run_dir}: the latest checkpoint is at step {info.step}, beyond --steps {cfg.train.steps}"
        )
    if info.step == cfg.train.steps and (run_dir / "summary.json").is_file():
        raise UsageError(
            f"{run_dir} already finished all {info.step} steps; give --steps N (more than {info.step}) to train on"
        )
    return cfg, info


def prepare(
    config: str | None,
    overrides: dict[str, dict[str, Any]],
    resume: Path | None = None,
    run_dir: Path | None = None,
) -> tuple[PreparedRun, Path | None]:
    """`moectl train`'s flags to a checked plan and the run directory to write (a resume writes into
    the run it continues). Under `srun`, SLURM's variables supply the nodes and the rendezvous the
    flags leave out (moectl.run.slurm)."""
    slurm = slurm_layout(frozenset(overrides.get("parallel", {})))
    overrides = merge_overrides({"parallel": slurm}, overrides) if slurm else overrides
    if resume is None:
        cfg = resolve(config, overrides)
        if run_dir is None and cfg.run_dir is None:
            cfg.run_dir = slurm_run_dir(cfg.parallel.strategy)
        return check_run(cfg), run_dir
    if config is not None:
        raise UsageError("--resume continues with the run's own config.yaml; drop --config")
    if run_dir is not None and run_dir.resolve() != resume.resolve():
        raise UsageError("--resume writes into the run it continues; drop --run-dir")
    return check_run(*resolve_resume(resume, overrides, frozenset(slurm))), resume


def check_run(cfg: RunConfig, resume_from: CheckpointInfo | None = None) -> PreparedRun:
    """World size from --nproc (or the outside launcher, or the degrees); every degree checked."""
    parallel = cfg.parallel
    if runtime.under_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        nproc_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    elif parallel.nproc:
        nproc_per_node, world_size = parallel.nproc, parallel.nproc * parallel.nnodes
    else:
        world_size = None
    strategy = build_strategy(cfg, world_size)
    cfg.parallel.options = strategy.options.by_key()  # config.yaml records every option's value
    if world_size is None:
        world_size = strategy.dims.world_size
        if world_size % parallel.nnodes:
            raise UsageError(
                f"--nnodes {parallel.nnodes}: the degrees give {world_size} process(es) in all, which do not "
                "split evenly over the nodes; give --nproc N, the processes on each node"
            )
        nproc_per_node = world_size // parallel.nnodes

    train = cfg.train
    dp = strategy.dims.dp
    per_step = train.micro_batch * dp
    if train.global_batch % per_step:
        raise UsageError(
            f"global batch {train.global_batch} is not a multiple of micro-batch {train.micro_batch} × "
            f"data-parallel degree {dp} = {per_step}; use --global-batch {max(per_step, train.global_batch // per_step * per_step)}"
        )
    if train.seq_len > cfg.model.max_position_embeddings:
        raise UsageError(
            f"--seq-len {train.seq_len} exceeds model.max_position_embeddings {cfg.model.max_position_embeddings}"
        )
    if runtime.uses_gpu(train):
        if not torch.cuda.is_available():
            raise UsageError("train.device is cuda but no GPU is visible; use --set train.device=cpu")
        if nproc_per_node > torch.cuda.device_count():
            raise UsageError(
                f"{nproc_per_node} processes per node but {torch.cuda.device_count()} GPUs; lower --nproc"
            )
    if train.fp8 or train.fp8_experts:
        from moectl.model import fp8

        on_gpu = runtime.uses_gpu(train)
        fp8.check(train, on_gpu, runtime.precision(train, on_gpu).compute_dtype, strategy)
    check_data(cfg.data, cfg.model.vocab_size, train.seq_len, train.global_batch)
    if train.attention == "flex_attention" and not runtime.uses_gpu(train):
        raise UsageError(
            "train.attention=flex_attention trains on GPUs only (torch's FlexAttention has no backward on "
            "the CPU); use sdpa or eager here"
        )
    if train.eval_every and not (cfg.data.val_source or cfg.data.val_fraction):
        raise UsageError(
            f"train.eval_every={train.eval_every} evaluates a validation set: give --val-data SRC or "
            "--set data.val_fraction=F"
        )
    if cfg.model.path and resume_from is None:  # a resume takes its weights from the checkpoint
        from moectl.io.hf import HFCheckpoint

        HFCheckpoint(Path(cfg.model.path)).check_fits(cfg.model)
    if train.tensorboard:
        check_tensorboard_available()
    check_wandb(train)
    return PreparedRun(cfg, strategy, world_size, nproc_per_node, train.global_batch // per_step, resume_from)


def param_bytes(cfg: RunConfig) -> int:
    """Bytes per parameter as the run keeps them, in memory and in checkpoints: fp32 under `mixed` (the
    GPU default) and `fp32` (the CPU default), 2 under `bf16`."""
    return runtime.precision(cfg.train).param_dtype.itemsize


def memory_note(cfg: RunConfig) -> str:
    if cfg.train.precision != "auto":
        return f"train.precision={cfg.train.precision}"
    if not runtime.uses_gpu(cfg.train):
        return "auto: no GPU here; --set train.precision=mixed to size a GPU run"
    return "auto: GPU"


def memory_estimate_gib(
    cfg: RunConfig, strategy: Strategy, cost: StepCost, num_micro_batches: int, on_gpu: bool | None = None
) -> float:
    """The dry-run's memory estimate per rank (`estimate_memory_gib`) in the run's precision (`on_gpu`:
    whether `auto` means a GPU's; None: this machine's), from what `strategy` states it holds (`cost`):
    under `mixed` fp32 weights, gradients and optimizer state, bf16 activations and copies of the weights
    (`Strategy.compute_copy_params`), and the fp32 residual stream where FSDP2 does not cast the layers'
    inputs."""
    precision = runtime.precision(cfg.train, on_gpu)
    grads = cost.grads if num_micro_batches > 1 else cost.params
    return estimate_memory_gib(
        cfg.model,
        cfg.train,
        cost.params,
        precision.param_bytes,
        grads,
        compute_bytes=precision.compute_bytes,
        compute_copy_params=strategy.compute_copy_params(cost, cfg.train) if precision.casts else 0.0,
        fp32_residual=precision.casts and not strategy.layer_inputs_in_compute_dtype(cost),
    )


def describe(p: PreparedRun, console: Console) -> None:
    """The --dry-run report: resolved config, parameter counts, flops per token, memory per rank."""
    cfg = p.cfg
    counts = count_params(cfg.model)
    precision = runtime.precision(cfg.train)
    cost = p.strategy.step_cost(cfg.train, p.nproc_per_node, precision)
    console.print(cfg.to_yaml(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"{p.strategy.name} on {p.world_size} process(es):", markup=False, highlight=False)
    rows = [
        ("total parameters", f"{format_count(counts.total)} ({counts.total:,})"),
        ("active parameters / token", f"{format_count(counts.active)} ({counts.active:,})"),
        (
            "active matmul parameters / token",
            f"{format_count(counts.active_matmul)} ({counts.active_matmul:,})",
        ),
        (
            "flops / token (6·N_active_matmul + attention)",
            f"{flops_per_token(cfg.model, cfg.train.seq_len):.4g}",
        ),
        ("flops / token, seed style (6·N_active)", f"{seed_flops_per_token(cfg.model):.4g}"),
        ("data-parallel degree", str(p.strategy.dims.dp)),
        ("micro-batches per step (accumulation)", str(p.num_micro_batches)),
    ]
    rows.append(("precision", f"{precision.describe()} ({memory_note(cfg)})"))
    if cost is None:
        rows.append(("parameters and memory per rank", f"n/a: {p.strategy.name} states no cost model"))
    else:
        memory = memory_estimate_gib(cfg, p.strategy, cost, p.num_micro_batches)
        rows += [
            ("parameters per rank", f"{format_count(cost.params)} ({round(cost.params):,})"),
            ("memory estimate per rank", f"{memory:.2f} GiB"),
        ]
    print_rows(console, rows)
