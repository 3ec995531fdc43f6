"""What a comparison found: one row per compared tensor, the key, shape and dtype problems, and the
verdict; as JSON for ``--json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from moectl.compare.kernels import relative


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
        return relative(self.diff_sq, self.ref_sq)

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


def severity(row: TensorDiff) -> tuple[bool, float, float]:
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
        return relative(sum(t.diff_sq for t in self.tensors), sum(t.ref_sq for t in self.tensors))

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
