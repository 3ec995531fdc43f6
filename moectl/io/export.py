"""`moectl export`: any step checkpoint of any layout to an HF model directory, on the CPU, one tensor
at a time.

A checkpoint (moectl.io.checkpoint) already holds every model tensor under its HF name in its global
layout, whatever strategy wrote it: DCP's metadata lists each tensor's boxes (FSDP shards, tp's gate/up
row blocks, ep's expert slices) at their canonical offsets. So each tensor is read whole with
torch.distributed.checkpoint's own reader (`dcp.load(no_dist=True)` into one preallocated full tensor,
every box copied to its place) and handed to the streaming writer (moectl.io.hf_writer); memory stays
near the largest tensor. The run's config.yaml, beside `checkpoints/`, gives the model; nothing else of
the run is needed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from moectl.config import RunConfig, build_config
from moectl.errors import UsageError
from moectl.io.checkpoint import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    META_FILE,
    STEP_DIR,
    latest_checkpoint,
    single_process_is_fine,
)
from moectl.io.hf_writer import (
    DEFAULT_MAX_SHARD_SIZE,
    HFModelWriter,
    check_max_shard_size,
    saved_tensor_shapes,
)
from moectl.io.outputs import check_writable
from moectl.model.build import hf_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DCP_METADATA = ".metadata"
#: a save in progress, or killed mid-way (moectl.io.checkpoint)
PARTIAL_DIR = re.compile(r"^\.step_\d+\.partial$")
FIX_PATH = "give RUN_DIR/checkpoints/step_N (or a run directory: its latest complete checkpoint)"
#: the top-level entry of a checkpoint that holds the model (the others: optimizer, extra)
MODEL_ENTRY = "model"


@dataclass(frozen=True)
class StepCheckpoint:
    path: Path  # RUN_DIR/checkpoints/step_N
    step: int
    run_dir: Path
    config: RunConfig
    meta: dict[str, Any]


def find_checkpoint(path: Path) -> StepCheckpoint:
    """The complete step checkpoint at `path` (or a run directory's latest), with its run's config."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"export: no such checkpoint {path}; {FIX_PATH}")
    if path.is_dir() and (path / "config.yaml").is_file():  # a run directory
        latest = latest_checkpoint(path)
        if latest is None:
            raise UsageError(
                f"export: run directory {path} has no complete checkpoint under {path / CHECKPOINTS_DIR}; "
                "runs write them with --checkpoint-every N"
            )
        path = latest.path
    match = STEP_DIR.match(path.name)
    if PARTIAL_DIR.match(path.name) or (match and path.is_dir() and not (path / COMPLETE_MARKER).is_file()):
        raise UsageError(
            f"export: {path} is a checkpoint cut short (no {COMPLETE_MARKER} marker); {_others(path)}"
        )
    if not (match and (path / DCP_METADATA).is_file()):
        raise UsageError(f"export: {path} is not a moectl checkpoint; {FIX_PATH}")
    run_dir = path.parent.parent
    config_file = run_dir / "config.yaml"
    if path.parent.name != CHECKPOINTS_DIR or not config_file.is_file():
        raise UsageError(
            f"export: {config_file} not found; the checkpoint must stay in its run directory "
            "(RUN_DIR/checkpoints/step_N beside RUN_DIR/config.yaml)"
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    return StepCheckpoint(path, int(match[1]), run_dir, build_config(str(config_file)), meta)


def _others(path: Path) -> str:
    """Which complete checkpoints sit beside `path`, as the fix."""
    complete = sorted(
        p.name for p in path.parent.glob("step_*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()
    )
    return (
        f"complete ones beside it: {', '.join(complete)}"
        if complete
        else "there is no complete one beside it"
    )


class _MetadataOnce(FileSystemReader):
    """DCP's file reader, reading `.metadata` once however many `dcp.load` calls go through it."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class CheckpointModelReader:
    """The model tensors of one DCP checkpoint, each read whole on the CPU (any layout wrote it)."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = _MetadataOnce(str(path))
        try:
            metadata = self.reader.read_metadata()
        except Exception as exc:  # a damaged pickle raises anything; all mean the same to the user
            raise UsageError(
                f"export: cannot read {path / DCP_METADATA} ({type(exc).__name__}); the checkpoint is damaged"
            ) from None
        sizes: dict[str, int] = {}
        for item in metadata.storage_data.values():
            file = path / item.relative_path
            if file.name not in sizes:
                sizes[file.name] = file.stat().st_size if file.is_file() else -1
            if sizes[file.name] < item.offset + item.length:
                raise UsageError(
                    f"export: {file} is missing or truncated; the checkpoint is damaged, export another step"
                )
        #: HF key -> its metadata (global shape, stored dtype, boxes)
        self.tensors: dict[str, TensorStorageMetadata] = {}
        for flat, where in (metadata.planner_data or {}).items():
            entry = metadata.state_dict_metadata.get(flat)
            if len(where) == 2 and where[0] == MODEL_ENTRY and isinstance(entry, TensorStorageMetadata):
                self.tensors[where[1]] = entry

    def read(self, name: str) -> torch.Tensor:
        entry = self.tensors[name]
        covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if covered != math.prod(entry.size):
            raise UsageError(
                f"export: {self.path} holds {covered} of the {math.prod(entry.size)} values of {name}; "
                "the checkpoint is damaged"
            )
        tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
        try:
            with single_process_is_fine():
                dcp.load({MODEL_ENTRY: {name: tensor}}, storage_reader=self.reader, no_dist=True)
        except (Exception, CheckpointException) as exc:  # (CheckpointException is a BaseException)
            reason = " ".join(str(exc).split())[:200]
            raise UsageError(
                f"export: cannot read {name} from {self.path} ({reason}); the checkpoint is damaged"
            ) from None
        return tensor


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    dtype: str = "auto",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: bool = True,
) -> StepCheckpoint:
    """Write the model of a step checkpoint to `out` as `save_pretrained` would; every check first, and
    `out` appears only once complete. `dtype` auto: the dtype the run writes its model/ in."""
    source = find_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"export: {out} already exists and is not empty; give a new output directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    check_writable(parent)
    try:
        check_max_shard_size(max_shard_size)
    except ValueError:
        raise UsageError(
            f"export: --max-shard-size {max_shard_size!r} is not a size like 5GB or 500MB"
        ) from None
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"export: --dtype must be auto, {' or '.join(DTYPES)}, got {dtype!r}")
    tokenizer_dir = _tokenizer_dir(source) if tokenizer else None
    reader = CheckpointModelReader(source.path)
    config = hf_config(source.config.model)
    expected = saved_tensor_shapes(config)
    _check_fits(reader, expected, source)
    write_dtype = _export_dtype(dtype, source, reader)
    with HFModelWriter(out, config, write_dtype, max_shard_size, tokenizer_dir) as writer:
        for name in expected:
            tensor = reader.read(name)
            if not torch.isfinite(tensor).all():
                raise UsageError(
                    f"export: {name} in {source.path} holds non-finite values; export another step"
                )
            writer.add(name, tensor)
            del tensor
        writer.commit()
    return source


def _check_fits(
    reader: CheckpointModelReader, expected: dict[str, tuple[int, ...]], source: StepCheckpoint
) -> None:
    where = f"export: {source.path} does not match {source.run_dir / 'config.yaml'}"
    missing = [name for name in expected if name not in reader.tensors]
    if missing:
        raise UsageError(f"{where}: it lacks {len(missing)} model tensor(s), e.g. {missing[0]}")
    for name, shape in expected.items():
        stored = tuple(reader.tensors[name].size)
        if stored != tuple(shape):
            raise UsageError(f"{where}: {name} has shape {stored}, the config's model {tuple(shape)}")
    extra = [name for name in reader.tensors if name not in expected and name != "lm_head.weight"]
    if extra:
        raise UsageError(
            f"{where}: it holds {len(extra)} tensor(s) the model has no place for, e.g. {extra[0]}"
        )


def _export_dtype(dtype: str, source: StepCheckpoint, reader: CheckpointModelReader) -> torch.dtype:
    """auto: the dtype the run writes model/ in (meta.json's `model_dtype`), else the weights' stored one."""
    if dtype != "auto":
        return DTYPES[dtype]
    saved = source.meta.get("model_dtype")
    if isinstance(saved, str) and saved in DTYPES:
        return DTYPES[saved]
    return next(iter(reader.tensors.values())).properties.dtype


def _tokenizer_dir(source: StepCheckpoint) -> Path | None:
    """The run's tokenizer (data.tokenizer), to be exported beside the weights."""
    name = source.config.data.tokenizer
    if not name:
        return None
    directory = Path(name)
    if not directory.is_dir():
        raise UsageError(
            f"export: the run's tokenizer {directory} (data.tokenizer) is gone; restore it, or add "
            "--no-tokenizer to export the weights alone"
        )
    return directory
