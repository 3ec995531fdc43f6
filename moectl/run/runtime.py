"""Process-level setup: which device, which precision, and the process group when there are peers."""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from moectl.config import TrainConfig
from moectl.errors import under_torchrun
from moectl.model.precision import Precision, resolve_precision


def uses_gpu(train: TrainConfig) -> bool:
    """Whether a run with these settings trains on GPUs (the one place that decides it)."""
    return train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())


def precision(train: TrainConfig, on_gpu: bool | None = None) -> Precision:
    """The run's `train.precision` (`auto`: mixed on GPUs, fp32 on CPUs); `on_gpu` None: this machine's."""
    return resolve_precision(train.precision, uses_gpu(train) if on_gpu is None else on_gpu)


def training_dtype(train: TrainConfig, on_gpu: bool) -> torch.dtype:
    """The dtype the run computes in (bf16 under `bf16` and `mixed`), which the numerics tolerance of a
    weight comparison follows. Where weights live: `precision(train).param_dtype`."""
    return precision(train, on_gpu).compute_dtype


def pick_device(train: TrainConfig) -> torch.device:
    """This process's device (its local rank's GPU), made current."""
    if not uses_gpu(train):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(device: torch.device, timeout_s: int) -> None:
    """nccl on GPUs, gloo on the CPU; a dead peer surfaces as an error after `timeout_s`, never a hang."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) == 1 and not under_torchrun():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several CPU workers share the cores: split them so threads do not oversubscribe. An explicit
        # OMP_NUM_THREADS wins (e.g. several "nodes" on one machine, which no worker can see).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flush_output() -> None:
    """Write out what this process printed or logged: Python's stdout and stderr, and every logging
    handler (flushed and closed, `logging.shutdown`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()


def exit_without_finalization(code: int) -> NoReturn:
    """Leave a process that ran a process group in its own interpreter (a worker of an outside torchrun)
    once its output is out (`flush_output`); the run's files (metrics, TensorBoard events, checkpoints,
    summary, model) are closed by the loop before.

    Why not finalize: torch keeps DeviceMeshes, and through them their gloo process groups, in
    module-level caches past `destroy_process_group` (DTensor's sharding propagation, its redistribute
    planner and more, which differ between torch versions). Destroyed during finalization, a gloo
    group's worker thread can no longer take the GIL and the process aborts ("terminate called without
    an active exception") after a run that succeeded: 2-rank tp runs under torchrun on torch 2.13 (see
    BENCHMARKS.md, "Leaving the interpreter"). Workers the launcher forks leave the same way through
    multiprocessing's own exit.
    """
    flush_output()
    os._exit(code)
