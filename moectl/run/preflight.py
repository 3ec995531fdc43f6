"""Checks that run in the launching process before anything is written: a checkpoint to resume from
is whole and fits the model, and the disk holds the final model and the checkpoints the run keeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from moectl.config import RunConfig
from moectl.errors import UsageError
from moectl.io.checkpoint import CheckpointInfo
from moectl.model.build import build_meta_model
from moectl.model.precision import save_dtype
from moectl.model.sizing import count_params, format_bytes, optimizer_states_per_param


def verify_checkpoint(info: CheckpointInfo, cfg: RunConfig) -> None:
    """Refuse a checkpoint DCP could not load: unreadable metadata, missing or short shard files,
    or tensors that do not fit this model."""
    where = f"checkpoint {info.path}"
    try:
        metadata = FileSystemReader(str(info.path)).read_metadata()
        storage = dict(metadata.storage_data)
        tensors = metadata.state_dict_metadata
    except Exception as exc:  # a damaged pickle raises anything; all mean the same to the user
        raise UsageError(
            f"{where} is corrupt ({type(exc).__name__}); delete it to resume from the one before"
        ) from None
    sizes: dict[str, int] = {}
    for item in storage.values():
        file = item.relative_path
        if file not in sizes:
            sizes[file] = (info.path / file).stat().st_size if (info.path / file).is_file() else -1
        if sizes[file] < item.offset + item.length:
            raise UsageError(
                f"{where} is incomplete ({file} is missing or truncated); delete it to resume from the one before"
            )
    model = build_meta_model(cfg.model, torch.float32)
    for name, param in model.named_parameters():
        saved = getattr(tensors.get(f"model.{name}"), "size", None)
        if saved is None or tuple(saved) != tuple(param.shape):
            raise UsageError(
                f"{where} does not fit the model: {name} is "
                f"{'absent' if saved is None else tuple(saved)}, the model needs {tuple(param.shape)}"
            )


def checkpoint_bytes(cfg: RunConfig, param_bytes: int) -> int:
    """Size of one checkpoint: the weights plus the optimizer's per-parameter state."""
    return count_params(cfg.model).total * param_bytes * (1 + optimizer_states_per_param(cfg.train))


def required_disk_bytes(cfg: RunConfig, param_bytes: int, steps_done: int = 0) -> int:
    """Final model (in its save dtype) plus the checkpoints that will exist at once (kept ones + one being
    written; `param_bytes` per weight and optimizer value)."""
    train = cfg.train
    model_bytes = save_dtype(train.save_dtype, cfg.model.dtype).itemsize
    total = count_params(cfg.model).total * model_bytes if train.save_model else 0
    if train.checkpoint_every > 0:
        num_saves = train.steps // train.checkpoint_every - steps_done // train.checkpoint_every
        resident = num_saves if train.keep_checkpoints == 0 else min(num_saves, train.keep_checkpoints)
        total += (resident + (1 if num_saves else 0)) * checkpoint_bytes(cfg, param_bytes)
    return total


def check_disk_space(run_dir: Path, cfg: RunConfig, param_bytes: int, steps_done: int = 0) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    needed = required_disk_bytes(cfg, param_bytes, steps_done)
    if needed > free:
        raise UsageError(
            f"{existing} has {format_bytes(free)} free but the final model and checkpoints need about "
            f"{format_bytes(needed)}; free space, pick another --run-dir, lower train.keep_checkpoints "
            "or set train.save_model=false"
        )
