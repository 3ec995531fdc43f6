"""Read-only memory maps of checkpoint files for the comparison, with resident memory kept bounded."""

from __future__ import annotations

import mmap
import threading
import warnings
from contextlib import suppress
from pathlib import Path

import torch

from moectl.errors import UsageError
from moectl.io.safetensors_reader import DTYPES, FIX_DAMAGED, UnitLocation

#: After this many bytes are released, drop whole mappings (see ``MappedFiles``).
_FULL_DROP_BYTES = 64 << 20


class MappedFiles:
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
