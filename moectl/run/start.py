"""Start a prepared run: train in this process (world 1, or inside an outside torchrun) or launch the
workers that train (moectl.run.launch); either way into a run directory made here, after every check."""

from __future__ import annotations

import re
from pathlib import Path

import torch.distributed as dist

from moectl.config import RunConfig
from moectl.io.outputs import (
    check_run_dir_writable,
    check_writable,
    create_run_dir,
    default_run_dir,
    write_text_atomic,
)
from moectl.registry import short_name
from moectl.run import runtime
from moectl.run.preflight import check_disk_space
from moectl.run.prepare import PreparedRun, param_bytes
from moectl.strategy import Strategy


def run(p: PreparedRun, run_dir: Path | None) -> Path:
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
    from moectl.run.launch import launch_workers

    node_dir = _node_dir(cfg, target)
    launch_workers(cfg.parallel, p.nproc_per_node, node_dir / "config.yaml", node_dir)
    return target


def _train_here(cfg: RunConfig, strategy: Strategy, run_dir: Path) -> None:
    # Imported only by the processes that train: a launcher checks and starts workers, and the training
    # loop's imports (transformers among them) would add seconds to every launch.
    from moectl.plan.predict import run_prediction
    from moectl.run.loop import run_training

    run_training(cfg, strategy, run_dir, run_prediction(cfg, strategy))


def _node_dir(cfg: RunConfig, target: Path) -> Path:
    """Where this node's launcher writes: the run directory on node 0, `node<k>/` inside it on node k.

    Global rank 0 runs on node 0 (static rendezvous) and writes the model and metrics at the top;
    other nodes write only their own config copy and worker logs, so a run directory on a shared
    file system holds every node's logs without two nodes writing the same file.
    """
    node_rank = cfg.parallel.node_rank
    return target if node_rank == 0 or cfg.parallel.nnodes == 1 else target / f"node{node_rank}"


def _prepare_run_dir(p: PreparedRun, run_dir: Path | None) -> Path:
    """A fresh run gets a new directory; a resume rewrites config.yaml with its (maybe new) layout."""
    cfg = p.cfg
    if p.resume_from is not None:
        target = Path(cfg.run_dir)
        check_writable(target)
        check_disk_space(target, cfg, param_bytes(cfg), p.resume_from.step)
        write_text_atomic(target / "config.yaml", cfg.to_yaml())
        return target
    target = Path(run_dir or cfg.run_dir or default_run_dir(short_name(cfg.parallel.strategy)))
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
