"""`moectl train` as a library function: resolve and check everything, then run or launch.

Every check that can fail on user input runs here (`prepare`), before the run directory exists, so
bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from moectl import runtime
from moectl.checkpoint import CheckpointInfo, latest_checkpoint
from moectl.config import ParallelConfig, RunConfig, build_config, merge_overrides
from moectl.data import check_data
from moectl.errors import UsageError
from moectl.metrics import (
    count_params,
    estimate_memory_gib,
    flops_per_token,
    format_count,
    seed_flops_per_token,
)
from moectl.model import model_config_from_hf_dir
from moectl.outputs import (
    check_run_dir_writable,
    check_writable,
    create_run_dir,
    default_run_dir,
    write_text_atomic,
)
from moectl.preflight import check_disk_space, verify_checkpoint
from moectl.registry import get_strategy
from moectl.strategy import Strategy
from moectl.tensorboard_log import check_available as check_tensorboard_available


@dataclass
class RunPlan:
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


# A resume may change how the run is laid out, never what it computes.
LAYOUT_KEYS = (
    "nproc",
    "dp_size",
    "tp_size",
    "ep_size",
    "nnodes",
    "node_rank",
    "rdzv_endpoint",
    "fsdp",
    "mixed_dp",
    "ep_chunks",
    "ep_max_rows_factor",
)
FIXED_ON_RESUME = {
    "model": None,  # every key
    "data": None,
    "train": ("seed", "global_batch", "seq_len", "optimizer", "momentum"),
}


def resolve_resume(run_dir: Path, overrides: dict[str, dict[str, Any]]) -> tuple[RunConfig, CheckpointInfo]:
    """The saved config.yaml of `run_dir` with the new flags on top, and the checkpoint to continue from.

    Any parallel flag replaces the saved layout as a whole (the saved strategy stays unless
    --strategy is given): `--resume R --nproc 4` means "ddp on 4", not "ddp on 4 with the old
    dp_size". Keys that define the computation (model, data, seed, batch shape, optimizer kind)
    cannot change: the checkpoint would not fit them.
    """
    config_file = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: no such directory; give the run directory to continue")
    if not config_file.is_file():
        raise UsageError(f"--resume {run_dir} is not a moectl run directory (no config.yaml)")
    info = latest_checkpoint(run_dir)
    if info is None:
        raise UsageError(
            f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}; "
            "runs write them with --checkpoint-every N"
        )
    saved = build_config(str(config_file))
    if set(overrides.get("parallel", {})) - {"timeout_s"}:
        defaults = asdict(ParallelConfig())
        fresh_layout = {key: defaults[key] for key in LAYOUT_KEYS}
        overrides = {**overrides, "parallel": {**fresh_layout, **overrides["parallel"]}}
    cfg = build_config(str(config_file), overrides)
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
) -> tuple[RunPlan, Path | None]:
    """`moectl train`'s flags to a checked plan and the run directory to write (a resume writes into
    the run it continues)."""
    if resume is None:
        return plan(resolve(config, overrides)), run_dir
    if config is not None:
        raise UsageError("--resume continues with the run's own config.yaml; drop --config")
    if run_dir is not None and run_dir.resolve() != resume.resolve():
        raise UsageError("--resume writes into the run it continues; drop --run-dir")
    return plan(*resolve_resume(resume, overrides)), resume


def build_strategy(
    cfg: RunConfig, world_size: int | None, strategy_cls: type[Strategy] | None = None
) -> Strategy:
    """The strategy (`cfg.parallel.strategy` unless given) with its degrees checked against the world
    and the model: the one place they are checked."""
    strategy_cls = strategy_cls or get_strategy(cfg.parallel.strategy)
    dims = strategy_cls.parallel_dims(cfg.parallel, world_size)
    dims.check(cfg.model, strategy_cls.name)
    return strategy_cls(dims, cfg.model, cfg.parallel)


def plan(cfg: RunConfig, resume_from: CheckpointInfo | None = None) -> RunPlan:
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
    if world_size is None:
        world_size = strategy.dims.world_size
        if world_size % parallel.nnodes:
            raise UsageError(
                f"world size {world_size} does not split over {parallel.nnodes} nodes; give --nproc"
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
        from moectl import fp8

        on_gpu = runtime.uses_gpu(train)
        fp8.check(train, on_gpu, runtime.training_dtype(train, on_gpu), strategy.name, strategy.dims.tp)
    if cfg.data.source != "synthetic":
        check_data(cfg.data, cfg.model.vocab_size, train.seq_len)
    if cfg.model.path and resume_from is None:  # a resume takes its weights from the checkpoint
        from moectl.hf_io import HFCheckpoint

        HFCheckpoint(Path(cfg.model.path)).check_fits(cfg.model)
    if train.tensorboard:
        check_tensorboard_available()
    return RunPlan(cfg, strategy, world_size, nproc_per_node, train.global_batch // per_step, resume_from)


def param_bytes(cfg: RunConfig) -> int:
    """Bytes per parameter as the run will hold (and save) them: bf16 on GPUs unless told otherwise."""
    return runtime.training_dtype(cfg.train, runtime.uses_gpu(cfg.train)).itemsize


def memory_note(cfg: RunConfig) -> str:
    if cfg.train.dtype != "auto":
        return f"train.dtype={cfg.train.dtype}"
    if param_bytes(cfg) == 4:
        return "auto: no GPU here; --set train.dtype=bfloat16 to size a GPU run"
    return "auto: GPU"


def describe(p: RunPlan, console: Console) -> None:
    """The --dry-run report: resolved config, parameter counts, flops per token, memory per rank."""
    cfg = p.cfg
    counts = count_params(cfg.model)
    per_rank = p.strategy.params_per_rank(counts)
    grads = p.strategy.grad_params_per_rank(counts, p.num_micro_batches)
    memory = estimate_memory_gib(cfg.model, cfg.train, per_rank, param_bytes(cfg), grads)
    console.print(cfg.to_yaml(), markup=False, highlight=False)
    table = Table(title=f"{p.strategy.name} on {p.world_size} process(es)", show_header=False)
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
        ("parameters per rank", f"{format_count(per_rank)} ({round(per_rank):,})"),
        (
            "memory estimate per rank",
            f"{memory:.2f} GiB at {'bf16' if param_bytes(cfg) == 2 else 'fp32'} ({memory_note(cfg)})",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def run(p: RunPlan, run_dir: Path | None) -> Path:
    """Run on this process (world 1, or inside an outside torchrun) or launch workers; returns the run
    directory (its summary.json holds what the run measured)."""
    cfg = p.cfg
    if runtime.under_torchrun():
        device = runtime.pick_device(cfg.train)
        runtime.init_process_group(device, cfg.parallel.timeout_s)
        target = [None]
        if runtime.rank() == 0:
            target[0] = str(_prepare_run_dir(p, run_dir))
        if dist.is_initialized():
            dist.broadcast_object_list(target, src=0)
        try:
            _train_here(cfg, p.strategy, Path(target[0]))
            return Path(target[0])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    target = _prepare_run_dir(p, run_dir)
    if p.world_size == 1 and cfg.parallel.nnodes == 1:
        _train_here(cfg, p.strategy, target)
        return target
    from moectl.launch import launch_workers

    node_dir = _node_dir(cfg, target)
    launch_workers(cfg.parallel, p.nproc_per_node, node_dir / "config.yaml", node_dir)
    return target


def _train_here(cfg: RunConfig, strategy: Strategy, run_dir: Path) -> None:
    # Imported only by the processes that train: a launcher checks and starts workers, and the training
    # loop's imports (transformers among them) would add seconds to every launch.
    from moectl.loop import run_training

    run_training(cfg, strategy, run_dir)


def _node_dir(cfg: RunConfig, target: Path) -> Path:
    """Where this node's launcher writes: the run directory on node 0, `node<k>/` inside it on node k.

    Global rank 0 runs on node 0 (static rendezvous) and writes the model and metrics at the top;
    other nodes write only their own config copy and worker logs, so a run directory on a shared
    file system holds every node's logs without two nodes writing the same file.
    """
    node_rank = cfg.parallel.node_rank
    return target if node_rank == 0 or cfg.parallel.nnodes == 1 else target / f"node{node_rank}"


def _prepare_run_dir(p: RunPlan, run_dir: Path | None) -> Path:
    """A fresh run gets a new directory; a resume rewrites config.yaml with its (maybe new) layout."""
    cfg = p.cfg
    if p.resume_from is not None:
        target = Path(cfg.run_dir)
        check_writable(target)
        check_disk_space(target, cfg, param_bytes(cfg), p.resume_from.step)
        write_text_atomic(target / "config.yaml", cfg.to_yaml())
        return target
    target = Path(run_dir or cfg.run_dir or default_run_dir(cfg.parallel.strategy))
    cfg.run_dir = str(target)
    node_dir = _node_dir(cfg, target)
    if node_dir == target and cfg.parallel.nnodes > 1 and target.is_dir():
        # Another node may already have made its node<k>/ folder here (shared file system).
        others = [p for p in target.iterdir() if not re.fullmatch(r"node\d+", p.name)]
        if others:
            check_run_dir_writable(target)
    else:
        check_run_dir_writable(node_dir)
    check_disk_space(target, cfg, param_bytes(cfg))  # after the write check: /proc has "0 bytes free"
    create_run_dir(node_dir, cfg.to_yaml())
    return target
