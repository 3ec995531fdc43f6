"""Reading safetensors checkpoints without trusting them: every header is parsed and checked against
the file size (8-byte little-endian length + JSON; dtypes, shapes, byte ranges), and a checkpoint path
(a file, an index, or an HF model directory) is mapped to the canonical per-expert layout
(`moectl.io.hf_layout`). Reads headers only; nothing is ever unpickled. Used by `moectl compare-weights`
and by `--model` loading (`moectl.io.hf`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moectl.errors import UsageError
from moectl.io.hf_layout import canonical_units

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

#: The safetensors crate refuses headers above 100 MB; anything larger is corrupt.
MAX_HEADER_BYTES = 100_000_000

FIX_FORMAT = "pass a .safetensors file or an HF model directory"
FIX_DAMAGED = "re-copy or re-save the checkpoint"


def _build_dtype_table() -> dict[str, tuple[torch.dtype, int]]:
    names = {
        "BOOL": ("bool", 1),
        "U8": ("uint8", 1),
        "I8": ("int8", 1),
        "I16": ("int16", 2),
        "U16": ("uint16", 2),
        "I32": ("int32", 4),
        "U32": ("uint32", 4),
        "I64": ("int64", 8),
        "U64": ("uint64", 8),
        "F16": ("float16", 2),
        "BF16": ("bfloat16", 2),
        "F32": ("float32", 4),
        "F64": ("float64", 8),
        "F8_E4M3": ("float8_e4m3fn", 1),
        "F8_E5M2": ("float8_e5m2", 1),
        "F8_E8M0": ("float8_e8m0fnu", 1),
    }
    # Older torch builds lack some dtypes; those tensors are then reported as unsupported.
    return {st: (getattr(torch, name), size) for st, (name, size) in names.items() if hasattr(torch, name)}


#: safetensors dtype name -> (torch dtype, bytes per element)
DTYPES = _build_dtype_table()

#: Dtypes whose values are exact in float32, so the cheap float32 path loses nothing on upcast.
FLOAT32_EXACT = {"F16", "BF16", "F32", "F8_E4M3", "F8_E5M2", "F8_E8M0"}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as declared in a safetensors header, with absolute byte offsets in its file."""

    key: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsFile:
    """A validated safetensors file: every tensor's byte range lies inside the file."""

    path: Path
    size: int
    tensors: dict[str, StoredTensor]


def _header_error(path: Path, problem: str, data: bytes = b"") -> UsageError:
    if data.startswith(b"PK\x03\x04") or data[:1] == b"\x80":
        return UsageError(
            f"{path} is a PyTorch pickle/zip file (torch.save), not safetensors; convert it with "
            "safetensors.torch.save_file (moectl never unpickles)"
        )
    return UsageError(f"{path} is not a valid safetensors file ({problem}); {FIX_FORMAT}, or {FIX_DAMAGED}")


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and check a safetensors header without reading any tensor data.

    Checks: the 8-byte little-endian header length fits in the file, the header is a JSON object, each
    entry has a known dtype, a non-negative integer shape and ``data_offsets`` whose length matches
    ``numel * itemsize``, and the data ends within the file (so truncation is caught here).

    Raises:
        UsageError: with a one-line message naming the file, the problem and the fix.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _header_error(path, f"{size} bytes, too short for a header", prefix)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _header_error(
                    path, f"header length {header_len} does not fit a {size}-byte file", prefix
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise UsageError(
            f"cannot read {path}: {exc.strerror or exc}; check the path and permissions"
        ) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _header_error(path, "header is not JSON", prefix + raw[:8]) from None
    if not isinstance(header, dict):
        raise _header_error(path, "header is not a JSON object")

    data_start = 8 + header_len
    tensors: dict[str, StoredTensor] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _parse_header_entry(path, key, entry, data_start, size)
    return SafetensorsFile(path=path, size=size, tensors=tensors)


def _parse_header_entry(path: Path, key: str, entry: Any, data_start: int, size: int) -> StoredTensor:
    if not isinstance(entry, dict):
        raise _header_error(path, f"entry {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        if isinstance(dtype, str):
            raise UsageError(
                f"{path}: tensor {key!r} has dtype {dtype}, which moectl cannot compare with this torch "
                f"build (supported: {', '.join(sorted(DTYPES))}); convert it to one of those"
            )
        raise _header_error(path, f"entry {key!r} has no dtype")

    def is_index(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(shape, list) or not all(is_index(dim) for dim in shape):
        raise _header_error(path, f"entry {key!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_index(o) for o in offsets)):
        raise _header_error(path, f"entry {key!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise _header_error(path, f"entry {key!r} spans {end - begin} bytes, its shape needs {expected}")
    if data_start + end > size:
        raise UsageError(
            f"{path} is truncated: tensor {key!r} ends at byte {data_start + end} but the file has "
            f"{size} bytes; {FIX_DAMAGED}"
        )
    return StoredTensor(key=key, dtype=dtype, shape=tuple(shape), start=data_start + begin, nbytes=expected)


@dataclass(frozen=True)
class UnitLocation:
    """Where the bytes of one canonical unit live: a contiguous range of one file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its files and its tensors in the canonical per-expert layout."""

    path: Path
    files: tuple[SafetensorsFile, ...]
    units: dict[str, UnitLocation]  # canonical name -> location, in file order


def _resolve_files(path: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """The safetensors files of a checkpoint path, plus the index weight map when there is one."""
    if not path.exists():
        raise UsageError(f"{path} does not exist; {FIX_FORMAT}")
    if path.is_dir():
        if (path / SINGLE_FILE_NAME).is_file():
            return [path / SINGLE_FILE_NAME], None, None
        if (path / INDEX_FILE_NAME).is_file():
            return _resolve_index(path / INDEX_FILE_NAME)
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])}: pass the file itself)" if found else ""
        if not found and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
            hint = " (only PyTorch pickles found: convert them to safetensors; moectl never unpickles)"
        raise UsageError(f"{path} has no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME}{hint}; {FIX_FORMAT}")
    if path.name.endswith(".index.json"):
        return _resolve_index(path)
    return [path], None, None


def _resolve_index(index_path: Path) -> tuple[list[Path], dict[str, str], Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {index_path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{index_path} is not valid JSON; regenerate the index or {FIX_DAMAGED}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UsageError(f"{index_path} has no weight_map of key -> shard file; regenerate the index")
    shards: list[Path] = []
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / shard_name
        if not shard.is_file():
            raise UsageError(
                f"{index_path} names shard {shard_name}, which does not exist; copy the missing shard "
                "or regenerate the index"
            )
        shards.append(shard)
    return shards, weight_map, index_path


def open_checkpoint(path: Path) -> Checkpoint:
    """Resolve a checkpoint path, validate every file header, and map its tensors to canonical units.

    ``path`` is a ``.safetensors`` file, a ``*.index.json`` file, or a directory holding
    ``model.safetensors`` or ``model.safetensors.index.json``. Reads headers only.

    Raises:
        UsageError: missing path, not safetensors, corrupt or truncated file, an index naming a missing
            shard or a key its shard lacks, a key stored twice, or mixed expert layouts for one layer.
    """
    path = Path(path)
    file_paths, weight_map, index_path = _resolve_files(path)
    files = tuple(read_safetensors_header(p) for p in file_paths)

    owner: dict[str, SafetensorsFile] = {}
    for stored_file in files:
        for key in stored_file.tensors:
            if key in owner:
                raise UsageError(
                    f"tensor {key!r} is stored in both {owner[key].path.name} and {stored_file.path.name}; "
                    f"{FIX_DAMAGED}"
                )
            owner[key] = stored_file
    if weight_map is not None:
        for key, shard_name in weight_map.items():
            if key not in owner or owner[key].path.name != Path(shard_name).name:
                raise UsageError(
                    f"{index_path} maps {key!r} to {shard_name}, which does not contain it; regenerate "
                    "the index"
                )

    stored = {key: owner[key].tensors[key] for key in owner}
    try:
        units = canonical_units({key: tensor.shape for key, tensor in stored.items()})
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    locations: dict[str, UnitLocation] = {}
    for name, unit in units.items():
        tensor = stored[unit.source_key]
        itemsize = DTYPES[tensor.dtype][1]
        locations[name] = UnitLocation(
            name=name,
            file=owner[unit.source_key].path,
            dtype=tensor.dtype,
            shape=unit.shape,
            start=tensor.start + unit.element_offset * itemsize,
            nbytes=unit.numel * itemsize,
        )
    return Checkpoint(path=path, files=files, units=locations)
