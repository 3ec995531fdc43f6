"""Checkpoints for resume: model, optimizer, RNG and step, written with torch.distributed.checkpoint.

Why DCP: every rank writes only its own shards, and the files record *global* tensor layouts under
canonical HF keys (get_state_dict strips DDP/FSDP/compile/checkpoint-wrapper prefixes and flattens
the optimizer state to `state.<param>.<field>`). A checkpoint saved by one strategy or world size
therefore loads under any other: DCP reshards on load. The data position needs no saving of its
own: the data of step s is a pure function of (seed, s), so the step *is* the position.

Layout of a run directory:

    checkpoints/step_000010/   .metadata, __<rank>_0.distcp (DCP), rng_rank00000.pt …, meta.json, COMPLETE
    checkpoints/.step_000012.partial/   a save in progress (or killed mid-way): never read

A save goes into the hidden `.partial` directory and is renamed into place only after every rank
finished and rank 0 wrote `COMPLETE`, so a kill at any moment leaves either the whole checkpoint or
none. Resume takes the highest step whose directory holds `COMPLETE`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from moectl.config import TrainConfig
from moectl.io.dcp_layouts import LocalBoxes
from moectl.io.outputs import write_json_atomic, write_text_atomic
from moectl.run import runtime

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Flattened optimizer keys (`state.<param>.<field>`) survive any change of param groups or wrappers.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int  # optimizer steps completed = index of the next step's data
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_due(steps_done: int, train: TrainConfig) -> bool:
    return train.checkpoint_every > 0 and steps_done % train.checkpoint_every == 0


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Every checkpoint with its completion marker, oldest first; anything else is ignored."""
    found = []
    root = run_dir / CHECKPOINTS_DIR
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_DIR.match(path.name)
        if not (match and (path / COMPLETE_MARKER).is_file()):
            continue
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        found.append(CheckpointInfo(path, int(match[1]), meta))
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resume_hint(run_dir: Path | None) -> str:
    """What the user can do next, for messages after a stop or a crash."""
    latest = latest_checkpoint(run_dir) if run_dir else None
    if latest is None:
        return "no complete checkpoint was written"
    return f"last complete checkpoint: step {latest.step}; continue with: moectl train --resume {run_dir}"


# ---- what goes into a checkpoint ---------------------------------------------------------------
def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy) -> tuple[dict, list]:
    """{"model": …, "optimizer": …} with canonical keys, each tensor passed through the strategy's
    `checkpoint_tensor` (a DTensor view of a plain local shard, or `LocalBoxes` of a permuted one (moectl.io.dcp_layouts),
    for strategies that keep one). Also returns (container, key, original) for every tensor the
    strategy replaced, so loaded values can be copied back into the tensors the model and optimizer
    really use."""
    model_state, optim_state = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
    replaced = []
    for container, param_of in ((model_state, lambda key: key), (optim_state, _param_of_optim_key)):
        for key, value in container.items():
            if not isinstance(value, torch.Tensor):
                continue
            view = strategy.checkpoint_tensor(param_of(key), value)
            if view is not value:
                replaced.append((container, key, value))
                container[key] = view
    return {"model": model_state, "optimizer": optim_state}, replaced


def _param_of_optim_key(key: str) -> str:
    """`state.model.layers.0.mlp.gate.weight.exp_avg` -> `model.layers.0.mlp.gate.weight`."""
    return key.split(".", 1)[1].rpartition(".")[0] if key.startswith("state.") else key


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def single_process_is_fine() -> Iterator[None]:
    """DCP warns "assuming the intent is to save/load in a single process" without a process group: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    run_dir: Path,
    steps_done: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy,
    keep: int,
    extra: dict[str, torch.Tensor] | None = None,
    model_dtype: torch.dtype | None = None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final checkpoint directory.

    `extra`: training state beside the model and optimizer (the router bias, the expert load so
    far), tensors that are the same on every rank; their names go into meta.json. `model_dtype`: the
    dtype the run writes its model/ in, which `moectl export` writes this step in (meta.json)."""
    root = run_dir / CHECKPOINTS_DIR
    final = root / step_dir_name(steps_done)
    staging = root / f".{final.name}.partial"
    rank, is_rank0 = runtime.rank(), runtime.rank() == 0
    if is_rank0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    state, _ = _training_state(model, optimizer, strategy)
    if extra:
        state["extra"] = dict(extra)
    with single_process_is_fine():
        dcp.save(state, checkpoint_id=str(staging))
    first_param = next(model.parameters())
    torch.save(_rng_state(first_param.device), staging / f"rng_rank{rank:05d}.pt")
    _barrier()
    if is_rank0:
        meta = {
            "step": steps_done,
            "world_size": runtime.world_size(),
            "strategy": strategy.name,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__,
            "param_dtype": str(first_param.dtype),  # what the weights and optimizer state are kept in
            "extra": sorted(extra or {}),
        }
        if model_dtype is not None:
            meta["model_dtype"] = str(model_dtype).removeprefix("torch.")
        write_json_atomic(staging / META_FILE, meta)
        write_text_atomic(staging / COMPLETE_MARKER, "ok\n")
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
        _prune(root, keep, final.name)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _prune(root: Path, keep: int, current: str) -> None:
    """Drop leftovers of killed saves, and all but the newest `keep` checkpoints (0 keeps all)."""
    for path in root.glob(".step_*.partial"):
        shutil.rmtree(path, ignore_errors=True)
    complete = [info.path for info in complete_checkpoints(root.parent)]
    if keep > 0:
        for path in complete[:-keep]:
            if path.name != current:
                shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    info: CheckpointInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy,
    train: TrainConfig,
    extra: dict[str, torch.Tensor] | None = None,
) -> int:
    """Collective: fill model, optimizer and RNG from `info` under this run's layout; returns the step.

    The tensors of `extra` that the checkpoint holds (meta.json names them) are filled in place; the
    caller learns which from `info.meta["extra"]`."""
    state, replaced = _training_state(model, optimizer, strategy)
    saved_extra = set(info.meta.get("extra", []))
    wanted = {key: tensor for key, tensor in (extra or {}).items() if key in saved_extra}
    if wanted:
        state["extra"] = wanted
    with single_process_is_fine():
        dcp.load(state, checkpoint_id=str(info.path))
    for container, key, original in replaced:
        loaded = container[key]
        if not isinstance(loaded, LocalBoxes):  # those were loaded in place, into views of `original`
            target = original.to_local() if isinstance(original, DTensor) else original
            target.copy_(loaded.to_local() if isinstance(loaded, DTensor) else loaded)
        container[key] = original
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=STATE_DICT_OPTIONS,
    )
    # The config, not the checkpoint, owns the hyperparameters: a resume may change them. The learning
    # rate needs nothing here: the loop sets each step's from the schedule (moectl/run/schedule.py).
    for group in optimizer.param_groups:
        group["weight_decay"] = train.weight_decay
    saved_world = int(info.meta.get("world_size", 1))
    rng_file = info.path / f"rng_rank{runtime.rank() % saved_world:05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        device = next(model.parameters()).device
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    return info.step


def placeholder_source(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Initial values when resuming: zeros, overwritten by the checkpoint (reading the original
    weights again would cost a full model read for nothing)."""
    return torch.zeros(shape, device=device)


def restore_metrics(run_dir: Path, steps_done: int, is_rank0: bool) -> list[dict[str, Any]]:
    """Keep the metrics of the steps the checkpoint holds (steps count from 1: `steps_done` is the last
    kept) and drop the rest, which are redone; returns the kept records. A line cut short by a kill is
    dropped too. A file written when steps counted from 0 (its first step is 0) is renumbered."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if records and min(record["step"] for record in records) == 0:
        for record in records:
            record["step"] += 1
    records = [record for record in records if record["step"] <= steps_done]
    if is_rank0:
        write_text_atomic(path, "".join(f"{json.dumps(record)}\n" for record in records))
    return records
