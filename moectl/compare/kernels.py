"""The comparison's arithmetic: float64 running sums of one tensor, and the kernel that adds one chunk
of two tensors to them in reusable upcast buffers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moectl.io.safetensors_reader import FLOAT32_EXACT


@dataclass
class Sums:
    """float64 running totals for one tensor."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs_diff: float = 0.0
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def merge(self, other: Sums) -> None:
        self.diff_sq += other.diff_sq
        self.ref_sq += other.ref_sq
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.nonfinite_a += other.nonfinite_a
        self.nonfinite_b += other.nonfinite_b


class ChunkKernel:
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

    def accumulate(self, a: torch.Tensor, b: torch.Tensor, compute_dtype: torch.dtype, sums: Sums) -> None:
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
    def _accumulate_exact(a: torch.Tensor, b: torch.Tensor, sums: Sums) -> None:
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


def compute_dtype(dtype_a: str, dtype_b: str) -> torch.dtype:
    if dtype_a in FLOAT32_EXACT and dtype_b in FLOAT32_EXACT:
        return torch.float32
    return torch.float64


def relative(diff_sq: float, ref_sq: float) -> float:
    if ref_sq > 0:
        return math.sqrt(diff_sq) / math.sqrt(ref_sq)
    return 0.0 if diff_sq == 0 else math.inf
