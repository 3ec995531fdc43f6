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

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from moectl.compare.kernels import ChunkKernel, Sums, compute_dtype
from moectl.compare.mapped import MappedFiles
from moectl.compare.report import CompareReport, ShapeMismatch, TensorDiff, severity
from moectl.errors import UsageError
from moectl.io.safetensors_reader import DTYPES, UnitLocation, open_checkpoint

#: Elements per chunk: 512 Ki elements = 2 MiB per float32 buffer, two per worker, so they stay in cache.
CHUNK_ELEMENTS = 1 << 19

#: Elements per task handed to a worker thread (many chunks, so hand-offs cost nothing).
TASK_ELEMENTS = 1 << 23

#: At most this many worker threads, so a many-core host does not start dozens for memory-bound work.
MAX_WORKERS = 8


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
    if value is not None and not (isinstance(value, int | float) and 0 <= value < math.inf):
        raise UsageError(f"--{name} must be a finite number >= 0, got {value!r}")


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
    report.tensors = sorted(rows, key=severity, reverse=True)
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


def _compare_pairs(pairs: list[tuple[UnitLocation, UnitLocation]], progress: bool) -> list[Sums]:
    """Sums for every pair, computed by worker threads in tasks, merged in a fixed order."""
    tasks = _plan_tasks(pairs, TASK_ELEMENTS)
    maps_a, maps_b = MappedFiles(), MappedFiles()
    local = threading.local()

    def run_task(pieces: list[_Piece]) -> list[tuple[int, Sums]]:
        kernel = getattr(local, "kernel", None)
        if kernel is None:
            kernel = local.kernel = ChunkKernel(CHUNK_ELEMENTS)
        results = []
        for piece in pieces:
            unit_a, unit_b = pairs[piece.position]
            upcast = compute_dtype(unit_a.dtype, unit_b.dtype)
            sums = Sums()
            end = piece.first + piece.count
            for first in range(piece.first, end, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, end - first)
                chunk_a, chunk_b = maps_a.chunk(unit_a, first, count), maps_b.chunk(unit_b, first, count)
                kernel.accumulate(chunk_a, chunk_b, upcast, sums)
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

    results: list[list[tuple[int, Sums]] | None] = [None] * len(tasks)
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

    all_sums = [Sums() for _ in pairs]
    for task_results in results:  # task order, not completion order: the float sums are reproducible
        for position, sums in task_results or []:
            all_sums[position].merge(sums)
    return all_sums
