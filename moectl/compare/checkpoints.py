"""``moectl compare-weights A B``: tensor-by-tensor relative error between two safetensors checkpoints.

The metric is the project's numerics contract: ``‖A − B‖₂ / ‖B‖₂`` over all tensors (B is the
reference), also per tensor, plus the largest absolute difference.

Both sides are brought to the canonical per-expert layout (``moectl.io.hf_layout``), so a checkpoint
written by ``save_pretrained`` (per-expert keys) and one saved from ``model.state_dict()`` (fused
``gate_up_proj`` / ``down_proj``) compare equal when their weights are.

How it reads, and why:

* Every file's safetensors header is parsed and checked here first (8-byte little-endian length +
  JSON; dtypes, shapes, byte ranges within the file size), so a truncated or corrupt file is a
  one-line usage error before any tensor is compared. Nothing is ever unpickled.
* A canonical unit is always one contiguous byte range of one file (see ``CanonicalUnit``), so the
  data is read straight from read-only memory maps, in chunks of ``CHUNK_ELEMENTS`` elements. Each
  chunk is upcast into two preallocated float32 buffers (float64 for float64 or integer tensors)
  that stay in cache; its sums of squares (float32 BLAS dots within the chunk) are added to float64
  accumulators. After a chunk, its pages are dropped from the process's mapping (``MADV_DONTNEED``;
  the page cache keeps them), so resident memory stays at a few buffers instead of growing with the
  bytes read. ``safetensors.safe_open`` maps the same bytes but keeps every touched page resident
  until the file is closed (about the size of both open shards) and allocates a tensor per read;
  see bench/COMPARE_RESULTS.md.
* Work is spread over a few worker threads, each streaming its own slices of tensors with torch ops
  on one intra-op thread (see ``_single_threaded_torch_ops`` for why not OpenMP). Per-tensor sums
  are merged in a fixed order, so results do not depend on thread timing.
* Non-finite values are detected for free: if a chunk's float32 sums are not finite, the chunk is
  redone in float64 with explicit ``isfinite`` counts (this also handles float32 overflow of squares
  of huge but finite values). Non-finite values are counted per tensor and excluded from the norms.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from moectl.errors import UsageError
from moectl.io.outputs import write_json_atomic
from moectl.io.safetensors_reader import (
    DTYPES,
    FIX_DAMAGED,
    FLOAT32_EXACT,
    UnitLocation,
    open_checkpoint,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "CompareReport",
    "ShapeMismatch",
    "TensorDiff",
    "compare_checkpoints",
    "compare_command",
    "render_report",
]

#: Elements per chunk: 512 Ki elements = 2 MiB per float32 buffer, two per worker, so they stay in cache.
CHUNK_ELEMENTS = 1 << 19

#: Elements per task handed to a worker thread (many chunks, so hand-offs cost nothing).
TASK_ELEMENTS = 1 << 23

#: At most this many worker threads, so a many-core host does not start dozens for memory-bound work.
MAX_WORKERS = 8


#: After this many bytes are released, drop whole mappings (see ``_MappedFiles``).
_FULL_DROP_BYTES = 64 << 20


class _MappedFiles:
    """Read-only memory maps of checkpoint files, opened on first use and closed together.

    Resident memory stays bounded because each chunk's pages are dropped from the process after use
    (``MADV_DONTNEED``; the page cache keeps them). Dropping exactly a chunk's pages is not enough:
    a page fault also maps neighbouring cached pages (fault-around, large folios), including some that
    were already dropped, and those stay resident (measured: about 10% of the bytes read when chunks are
    not page-aligned). So every ``_FULL_DROP_BYTES`` the whole mappings are dropped too; that costs a
    page-table walk, and at worst a re-fault of another worker's current chunk.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._dont_need = getattr(mmap, "MADV_DONTNEED", None)
        self._released = 0
        _silence_read_only_buffer_warning()

    def _map(self, path: Path) -> mmap.mmap:
        mapped = self._maps.get(path)
        if mapped is not None:
            return mapped
        with self._lock:
            if path not in self._maps:
                try:
                    with open(path, "rb") as handle:
                        self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as exc:
                    raise UsageError(f"cannot map {path}: {exc}; {FIX_DAMAGED}") from None
            return self._maps[path]

    def chunk(self, location: UnitLocation, first: int, count: int) -> torch.Tensor:
        """Elements ``[first, first + count)`` of a unit, as a tensor over the mapped bytes."""
        torch_dtype, itemsize = DTYPES[location.dtype]
        offset = location.start + first * itemsize
        mapped = self._map(location.file)
        if offset + count * itemsize > len(mapped):
            raise UsageError(f"{location.file} shrank while being read; {FIX_DAMAGED}")
        if offset % itemsize:  # a writer that did not align its data: copy into an aligned buffer
            return torch.frombuffer(bytearray(mapped[offset : offset + count * itemsize]), dtype=torch_dtype)
        return torch.frombuffer(mapped, dtype=torch_dtype, count=count, offset=offset)

    def release(self, location: UnitLocation, first: int, count: int) -> None:
        """Drop a chunk's pages from this process (the page cache keeps them) to bound resident memory."""
        if self._dont_need is None:
            return
        itemsize = DTYPES[location.dtype][1]
        begin, length = _page_span(location.start + first * itemsize, count * itemsize)
        with suppress(OSError, ValueError):
            self._map(location.file).madvise(self._dont_need, begin, length)
        with self._lock:
            self._released += length
            drop_all = self._released >= _FULL_DROP_BYTES
            if drop_all:
                self._released = 0
        if drop_all:
            for mapped in list(self._maps.values()):
                with suppress(OSError, ValueError):
                    mapped.madvise(self._dont_need)

    def close(self) -> None:
        for mapped in self._maps.values():
            with suppress(BufferError):  # a tensor view still alive; the map closes when it is freed
                mapped.close()
        self._maps.clear()


def _silence_read_only_buffer_warning() -> None:
    """torch warns, once per process, when a tensor wraps a read-only buffer such as our maps. The
    tensors are only read, so trigger that one warning here, muted, on the calling thread: a
    ``warnings.catch_warnings`` around each read would not be thread-safe."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0", dtype=torch.uint8)


def _page_span(offset: int, nbytes: int) -> tuple[int, int]:
    """The page-aligned (start, length) covering ``nbytes`` bytes at ``offset``, as madvise needs."""
    begin = offset - offset % mmap.PAGESIZE
    end = offset + nbytes
    end += -end % mmap.PAGESIZE
    return begin, end - begin


# --------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sums:
    """float64 running totals for one tensor."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs_diff: float = 0.0
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def merge(self, other: _Sums) -> None:
        self.diff_sq += other.diff_sq
        self.ref_sq += other.ref_sq
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.nonfinite_a += other.nonfinite_a
        self.nonfinite_b += other.nonfinite_b


class _ChunkKernel:
    """Sums of squares of chunks, in reusable upcast buffers so no chunk allocates. One per thread."""

    def __init__(self, chunk_elements: int) -> None:
        self._chunk_elements = chunk_elements
        self._buffers: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _views(self, dtype: torch.dtype, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers.get(dtype)
        if buffers is None:
            buffers = (
                torch.empty(self._chunk_elements, dtype=dtype),
                torch.empty(self._chunk_elements, dtype=dtype),
            )
            self._buffers[dtype] = buffers
        return buffers[0][:count], buffers[1][:count]

    def accumulate(self, a: torch.Tensor, b: torch.Tensor, compute_dtype: torch.dtype, sums: _Sums) -> None:
        """Add one chunk's sums. Sums are float32 within the chunk (BLAS dot), float64 across chunks."""
        a_up, b_up = self._views(compute_dtype, a.numel())
        a_up.copy_(a)
        b_up.copy_(b)
        ref_sq = torch.dot(b_up, b_up)
        diff = a_up.sub_(b_up)
        diff_sq = torch.dot(diff, diff)
        low, high = torch.aminmax(diff)
        ref_sq_f, diff_sq_f, low_f, high_f = torch.stack([ref_sq, diff_sq, low, high]).tolist()
        if math.isfinite(ref_sq_f) and math.isfinite(diff_sq_f):
            # Both sums finite => every value of a and b is finite (a non-finite a makes diff non-finite).
            sums.ref_sq += ref_sq_f
            sums.diff_sq += diff_sq_f
            sums.max_abs_diff = max(sums.max_abs_diff, -low_f, high_f)
        else:
            self._accumulate_exact(a, b, sums)

    @staticmethod
    def _accumulate_exact(a: torch.Tensor, b: torch.Tensor, sums: _Sums) -> None:
        """float64 redo of a chunk: count non-finite values and sum over positions finite on both sides."""
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        finite_a, finite_b = torch.isfinite(a64), torch.isfinite(b64)
        sums.nonfinite_a += int(finite_a.numel() - finite_a.sum())
        sums.nonfinite_b += int(finite_b.numel() - finite_b.sum())
        both = finite_a & finite_b
        diff = (a64 - b64)[both]
        sums.ref_sq += float(b64[both].square().sum())
        sums.diff_sq += float(diff.square().sum())
        if diff.numel():
            sums.max_abs_diff = max(sums.max_abs_diff, float(diff.abs().max()))


def _compute_dtype(dtype_a: str, dtype_b: str) -> torch.dtype:
    if dtype_a in FLOAT32_EXACT and dtype_b in FLOAT32_EXACT:
        return torch.float32
    return torch.float64


def _relative(diff_sq: float, ref_sq: float) -> float:
    if ref_sq > 0:
        return math.sqrt(diff_sq) / math.sqrt(ref_sq)
    return 0.0 if diff_sq == 0 else math.inf


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorDiff:
    """Comparison of one canonical tensor present in both checkpoints with the same shape."""

    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    diff_sq: float  # Σ (a − b)² over positions finite on both sides, float64
    ref_sq: float  # Σ b² over the same positions
    max_abs_diff: float
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    @property
    def rel_err(self) -> float:
        """‖a − b‖₂ / ‖b‖₂ over finite values; inf when b is all zeros and a is not."""
        return _relative(self.diff_sq, self.ref_sq)

    @property
    def finite(self) -> bool:
        return self.nonfinite_a == 0 and self.nonfinite_b == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "rel_err": _json_float(self.rel_err),
            "max_abs_diff": _json_float(self.max_abs_diff),
            "diff_norm": _json_float(math.sqrt(self.diff_sq)),
            "ref_norm": _json_float(math.sqrt(self.ref_sq)),
            "nonfinite_a": self.nonfinite_a,
            "nonfinite_b": self.nonfinite_b,
        }


@dataclass(frozen=True)
class ShapeMismatch:
    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]


def _json_float(value: float) -> float | str:
    """JSON has no inf/nan: write them as the strings float() reads back ("inf", "nan")."""
    return value if math.isfinite(value) else str(value)


def _severity(row: TensorDiff) -> tuple[bool, float, float]:
    rel = row.rel_err
    return (not row.finite, math.inf if math.isnan(rel) else rel, row.max_abs_diff)


@dataclass
class CompareReport:
    """Everything ``compare_checkpoints`` found. ``tensors`` is sorted worst first."""

    path_a: str
    path_b: str
    rtol: float
    per_tensor_rtol: float | None
    tensors: list[TensorDiff] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in B, not in A
    extra: list[str] = field(default_factory=list)  # in A, not in B
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    dtype_mismatches: list[tuple[str, str, str]] = field(default_factory=list)  # (name, dtype_a, dtype_b)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def global_rel_err(self) -> float:
        """‖A − B‖₂ / ‖B‖₂ over all compared tensors (non-finite values excluded)."""
        return _relative(sum(t.diff_sq for t in self.tensors), sum(t.ref_sq for t in self.tensors))

    @property
    def global_max_abs_diff(self) -> float:
        return max((t.max_abs_diff for t in self.tensors), default=0.0)

    @property
    def nonfinite(self) -> list[TensorDiff]:
        """Tensors with NaN or ±inf on either side."""
        return [t for t in self.tensors if not t.finite]

    @property
    def over_per_tensor_rtol(self) -> list[TensorDiff]:
        if self.per_tensor_rtol is None:
            return []
        return [t for t in self.tensors if not t.rel_err <= self.per_tensor_rtol]

    @property
    def failures(self) -> list[str]:
        """Why the checkpoints do not match; empty when they do."""
        reasons = []
        if not self.global_rel_err <= self.rtol:
            reasons.append(f"global relative error {self.global_rel_err:.3e} > rtol {self.rtol:g}")
        if over := self.over_per_tensor_rtol:
            reasons.append(f"{len(over)} tensor(s) over per-tensor rtol {self.per_tensor_rtol:g}")
        if self.missing:
            reasons.append(f"{len(self.missing)} key(s) missing from A")
        if self.extra:
            reasons.append(f"{len(self.extra)} extra key(s) in A")
        if self.shape_mismatches:
            reasons.append(f"{len(self.shape_mismatches)} shape mismatch(es)")
        if nonfinite := self.nonfinite:
            reasons.append(f"non-finite values in {len(nonfinite)} tensor(s)")
        return reasons

    @property
    def matched(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.path_a,
            "b": self.path_b,
            "matched": self.matched,
            "failures": self.failures,
            "rtol": self.rtol,
            "per_tensor_rtol": self.per_tensor_rtol,
            "global": {
                "rel_err": _json_float(self.global_rel_err),
                "max_abs_diff": _json_float(self.global_max_abs_diff),
                "diff_norm": _json_float(math.sqrt(sum(t.diff_sq for t in self.tensors))),
                "ref_norm": _json_float(math.sqrt(sum(t.ref_sq for t in self.tensors))),
                "tensors_compared": len(self.tensors),
                "bytes_read": self.bytes_read,
                "seconds": round(self.seconds, 3),
            },
            "tensors": [t.to_dict() for t in self.tensors],
            "missing": self.missing,
            "extra": self.extra,
            "shape_mismatches": [
                {"name": m.name, "shape_a": list(m.shape_a), "shape_b": list(m.shape_b)}
                for m in self.shape_mismatches
            ],
            "dtype_mismatches": [
                {"name": n, "dtype_a": a, "dtype_b": b} for n, a, b in self.dtype_mismatches
            ],
            "nonfinite": [{"name": t.name, "a": t.nonfinite_a, "b": t.nonfinite_b} for t in self.nonfinite],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


@contextmanager
def _byte_progress(enabled: bool, total_bytes: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes on stderr, only when stderr is a terminal."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda _done: None
        return
    columns = (
        TextColumn("comparing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("compare", total=total_bytes)
        yield lambda done: progress.advance(task, done)


def _check_tolerance(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and value >= 0):
        raise UsageError(f"{name} must be a number >= 0, got {value!r}")


def compare_checkpoints(
    a: Path,
    b: Path,
    *,
    rtol: float = 1e-2,
    per_tensor_rtol: float | None = None,
    progress: bool = True,
) -> CompareReport:
    """Compare checkpoint ``a`` against reference ``b``, streaming one chunk at a time.

    Both are brought to the canonical per-expert layout first, so fused and per-expert checkpoints of
    the same weights compare equal. Only tensors present in both with equal shapes are compared
    numerically; a dtype difference alone is reported and the values compared after upcasting.
    Resident memory stays at a few chunk buffers whatever the checkpoint size.

    Args:
        a, b: a ``.safetensors`` file, a ``*.index.json``, or an HF model directory.
        rtol: limit on the global relative error ‖A − B‖₂ / ‖B‖₂.
        per_tensor_rtol: limit on every tensor's relative error; None disables the check.
        progress: show a progress bar over bytes when stderr is a terminal.

    Raises:
        UsageError: bad input (see ``open_checkpoint``), found before any tensor is compared.
    """
    _check_tolerance("rtol", rtol)
    _check_tolerance("per-tensor-rtol", per_tensor_rtol)
    started = time.perf_counter()
    checkpoint_a, checkpoint_b = open_checkpoint(Path(a)), open_checkpoint(Path(b))
    units_a, units_b = checkpoint_a.units, checkpoint_b.units
    report = CompareReport(path_a=str(a), path_b=str(b), rtol=rtol, per_tensor_rtol=per_tensor_rtol)
    report.missing = [name for name in units_b if name not in units_a]
    report.extra = [name for name in units_a if name not in units_b]

    file_order = {stored.path: i for i, stored in enumerate(checkpoint_a.files)}
    common = sorted(
        (name for name in units_a if name in units_b),
        key=lambda name: (file_order[units_a[name].file], units_a[name].start),
    )  # A's on-disk order, so A is read sequentially
    to_compare: list[str] = []
    for name in common:
        unit_a, unit_b = units_a[name], units_b[name]
        if unit_a.dtype != unit_b.dtype:
            report.dtype_mismatches.append((name, unit_a.dtype, unit_b.dtype))
        if unit_a.shape != unit_b.shape:
            report.shape_mismatches.append(ShapeMismatch(name, unit_a.shape, unit_b.shape))
        else:
            to_compare.append(name)

    pairs = [(units_a[name], units_b[name]) for name in to_compare]
    all_sums = _compare_pairs(pairs, progress)
    rows = [
        TensorDiff(
            name=unit_a.name,
            shape=unit_a.shape,
            dtype_a=unit_a.dtype,
            dtype_b=unit_b.dtype,
            diff_sq=sums.diff_sq,
            ref_sq=sums.ref_sq,
            max_abs_diff=sums.max_abs_diff,
            nonfinite_a=sums.nonfinite_a,
            nonfinite_b=sums.nonfinite_b,
        )
        for (unit_a, unit_b), sums in zip(pairs, all_sums, strict=True)
    ]
    report.tensors = sorted(rows, key=_severity, reverse=True)
    report.bytes_read = sum(unit_a.nbytes + unit_b.nbytes for unit_a, unit_b in pairs)
    report.seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True)
class _Piece:
    """Elements ``[first, first + count)`` of pair number ``position``."""

    position: int
    first: int
    count: int


def _plan_tasks(pairs: list[tuple[UnitLocation, UnitLocation]], task_elements: int) -> list[list[_Piece]]:
    """Cut the pairs into tasks of about ``task_elements`` elements: big tensors are split, small ones
    batched, so worker threads stay evenly loaded and hand-offs stay rare."""
    tasks: list[list[_Piece]] = []
    current: list[_Piece] = []
    filled = 0
    for position, (unit_a, _) in enumerate(pairs):
        first = 0
        while True:
            count = min(unit_a.numel - first, task_elements - filled)
            current.append(_Piece(position, first, count))
            filled += count
            first += count
            if filled >= task_elements:
                tasks.append(current)
                current, filled = [], 0
            if first >= unit_a.numel:
                break
    if current:
        tasks.append(current)
    return tasks


def _worker_count() -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, available))


@contextmanager
def _single_threaded_torch_ops() -> Iterator[None]:
    """Run torch ops on one intra-op thread while the comparison's own workers run.

    Parallelism comes from worker threads that each stream their own tensors. Intra-op OpenMP threads
    would synchronise at the end of every op; when the cores are shared (a busy box, other jobs), a
    descheduled OpenMP thread stalls each op by a scheduler tick, measured 50-100x slower on 2 cores.
    torch reads this setting when a new thread first runs an op, so the workers inherit it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compare_pairs(pairs: list[tuple[UnitLocation, UnitLocation]], progress: bool) -> list[_Sums]:
    """Sums for every pair, computed by worker threads in tasks, merged in a fixed order."""
    tasks = _plan_tasks(pairs, TASK_ELEMENTS)
    maps_a, maps_b = _MappedFiles(), _MappedFiles()
    local = threading.local()

    def run_task(pieces: list[_Piece]) -> list[tuple[int, _Sums]]:
        kernel = getattr(local, "kernel", None)
        if kernel is None:
            kernel = local.kernel = _ChunkKernel(CHUNK_ELEMENTS)
        results = []
        for piece in pieces:
            unit_a, unit_b = pairs[piece.position]
            compute_dtype = _compute_dtype(unit_a.dtype, unit_b.dtype)
            sums = _Sums()
            end = piece.first + piece.count
            for first in range(piece.first, end, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, end - first)
                chunk_a, chunk_b = maps_a.chunk(unit_a, first, count), maps_b.chunk(unit_b, first, count)
                kernel.accumulate(chunk_a, chunk_b, compute_dtype, sums)
                del chunk_a, chunk_b
                maps_a.release(unit_a, first, count)
                maps_b.release(unit_b, first, count)
            results.append((piece.position, sums))
        return results

    def task_bytes(pieces: list[_Piece]) -> int:
        return sum(
            piece.count
            * (DTYPES[pairs[piece.position][0].dtype][1] + DTYPES[pairs[piece.position][1].dtype][1])
            for piece in pieces
        )

    results: list[list[tuple[int, _Sums]] | None] = [None] * len(tasks)
    total_bytes = sum(a.nbytes + b.nbytes for a, b in pairs)
    executor = ThreadPoolExecutor(max_workers=_worker_count(), thread_name_prefix="moectl-compare")
    try:
        with _single_threaded_torch_ops(), _byte_progress(progress, total_bytes) as advance:
            futures = {executor.submit(run_task, pieces): number for number, pieces in enumerate(tasks)}
            for future in as_completed(futures):
                number = futures[future]
                results[number] = future.result()
                advance(task_bytes(tasks[number]))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        maps_a.close()
        maps_b.close()

    all_sums = [_Sums() for _ in pairs]
    for task_results in results:  # task order, not completion order: the float sums are reproducible
        for position, sums in task_results or []:
            all_sums[position].merge(sums)
    return all_sums


# --------------------------------------------------------------------------------------------------
# Presentation and command
# --------------------------------------------------------------------------------------------------

_LIST_LIMIT = 10


def _print_names(console: Console, title: str, names: list[str]) -> None:
    if not names:
        return
    console.print(f"[bold red]{title}[/] ({len(names)}):")
    for name in names[:_LIST_LIMIT]:
        console.print(f"  {name}", highlight=False)
    if len(names) > _LIST_LIMIT:
        console.print(f"  … and {len(names) - _LIST_LIMIT} more (all in --json)")


def render_report(report: CompareReport, console: Console, top: int = 20) -> None:
    """Print the report: the ``top`` worst tensors as a table, key/shape/dtype problems, the verdict."""
    gigabytes = report.bytes_read / 1e9
    console.print(
        f"A: {report.path_a}\nB: {report.path_b} (reference)\n"
        f"compared {len(report.tensors)} tensors, {gigabytes:.2f} GB in {report.seconds:.1f} s",
        highlight=False,
    )
    if top > 0 and report.tensors:
        shown = report.tensors[:top]
        table = Table(
            title=f"worst {len(shown)} of {len(report.tensors)} tensors",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("tensor", overflow="fold")
        table.add_column("shape", no_wrap=True)
        table.add_column("dtype", no_wrap=True)
        table.add_column("rel err", justify="right", no_wrap=True)
        table.add_column("max |A−B|", justify="right", no_wrap=True)
        for rank, row in enumerate(shown, start=1):
            over = report.per_tensor_rtol is not None and not row.rel_err <= report.per_tensor_rtol
            dtype = row.dtype_a if row.dtype_a == row.dtype_b else f"{row.dtype_a}/{row.dtype_b}"
            rel = f"{row.rel_err:.3e}"
            if not row.finite:
                rel += f" (non-finite A:{row.nonfinite_a} B:{row.nonfinite_b})"
            table.add_row(
                str(rank),
                row.name,
                "×".join(map(str, row.shape)),
                dtype,
                rel,
                f"{row.max_abs_diff:.3e}",
                style="red" if over or not row.finite else None,
            )
        console.print(table)

    _print_names(console, "missing from A (in B only)", report.missing)
    _print_names(console, "extra in A (not in B)", report.extra)
    _print_names(
        console,
        "shape mismatches",
        [f"{m.name}: A {list(m.shape_a)} vs B {list(m.shape_b)}" for m in report.shape_mismatches],
    )
    _print_names(
        console,
        "non-finite values",
        [f"{t.name}: A {t.nonfinite_a}, B {t.nonfinite_b}" for t in report.nonfinite],
    )
    if report.dtype_mismatches:
        console.print(f"[yellow]dtype differences[/] ({len(report.dtype_mismatches)}, compared numerically):")
        for name, dtype_a, dtype_b in report.dtype_mismatches[:_LIST_LIMIT]:
            console.print(f"  {name}: A {dtype_a} vs B {dtype_b}", highlight=False)
        if len(report.dtype_mismatches) > _LIST_LIMIT:
            console.print(f"  … and {len(report.dtype_mismatches) - _LIST_LIMIT} more (all in --json)")

    console.print(
        f"global relative error {report.global_rel_err:.3e} (rtol {report.rtol:g}), "
        f"max |A−B| {report.global_max_abs_diff:.3e}",
        highlight=False,
    )
    if report.matched:
        console.print("[bold green]MATCH[/]")
    else:
        console.print(f"[bold red]MISMATCH[/]: {'; '.join(report.failures)}", highlight=False)


def _check_json_target(json_path: Path) -> None:
    if json_path.is_dir():
        raise UsageError(
            f"--json {json_path} is a directory; pass a file path such as {json_path}/compare.json"
        )
    if not json_path.parent.is_dir():
        raise UsageError(f"--json {json_path}: directory {json_path.parent} does not exist; create it first")


def compare_command(
    a: Path,
    b: Path,
    rtol: float = 1e-2,
    per_tensor_rtol: float | None = None,
    top: int = 20,
    json_path: Path | None = None,
) -> int:
    """Run ``compare-weights``: print the report, optionally write JSON, return the exit code.

    Returns 0 when the checkpoints match, 1 when they do not, 2 on bad input. Bad input is printed to
    stderr as one line (no traceback) and nothing is written.
    """
    try:
        if top < 0:
            raise UsageError(f"--top must be >= 0, got {top}")
        if json_path is not None:
            _check_json_target(Path(json_path))
        report = compare_checkpoints(
            Path(a), Path(b), rtol=rtol, per_tensor_rtol=per_tensor_rtol, progress=True
        )
    except UsageError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    render_report(report, Console(), top)
    if json_path is not None:
        try:
            write_json_atomic(Path(json_path), report.to_dict())
        except OSError as exc:
            print(f"error: cannot write --json {json_path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0 if report.matched else 1
