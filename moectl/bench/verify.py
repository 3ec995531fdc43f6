"""Verification of a bench run against the reference: its final weights
(`moectl.compare.compare_checkpoints`) and its loss at every step must both match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moectl.bench.record import RunRecord
from moectl.compare import compare_checkpoints
from moectl.errors import UsageError


def steps_done(record: RunRecord) -> int:
    """The steps a finished run's final weights come after (its last recorded step)."""
    return record.loss_curve[-1]["step"] if record.loss_curve else 0


def loss_tolerance(rtol: float, reference_loss: float) -> float:
    """How far a step's loss may be from the reference's: `rtol` relative to the loss, absolute below 1."""
    return rtol * max(1.0, abs(reference_loss))


def loss_mismatch(record: RunRecord, reference: RunRecord, rtol: float) -> tuple[float | None, str | None]:
    """(largest |loss − reference loss| over the steps, why the curves do not match or None)."""
    losses = {p["step"]: p["loss"] for p in reference.loss_curve}
    diffs, worst = [], None
    for point in record.loss_curve:
        ref = losses.get(point["step"])
        if ref is None or point["loss"] is None:
            continue
        diff = abs(point["loss"] - ref)
        diffs.append(diff)
        if not diff <= loss_tolerance(rtol, ref) and worst is None:
            worst = (
                f"loss {point['loss']:.6g} at step {point['step']} differs from the reference's "
                f"{ref:.6g} by {diff:.2e} (tolerance {loss_tolerance(rtol, ref):.1e})"
            )
    steps, ref_steps = [p["step"] for p in record.loss_curve], sorted(losses)
    if worst is None and steps != ref_steps:
        worst = f"the run recorded {len(steps)} steps, the reference {len(ref_steps)}"
    return max(diffs, default=None), worst


def verify_against(record: RunRecord, reference: RunRecord, out: Path, rtol: float) -> dict[str, Any]:
    """Compare a run's final weights and its loss at every step with the reference's: both must match."""
    max_loss_diff, loss_failure = loss_mismatch(record, reference, rtol)
    result: dict[str, Any] = {
        "rtol": rtol,
        "steps": steps_done(record),
        "max_loss_diff": max_loss_diff,
        "worst_tensor": None,
        "worst_tensor_rel_err": None,
    }
    try:
        report = compare_checkpoints(
            out / record.run_dir / "model", out / reference.run_dir / "model", rtol=rtol, progress=False
        )
    except UsageError as exc:
        return {**result, "status": "error", "rel_err": None, "reason": str(exc)}
    if report.tensors:
        result["worst_tensor"], result["worst_tensor_rel_err"] = (
            report.tensors[0].name,
            report.tensors[0].rel_err,
        )
    failures = [*report.failures, *([loss_failure] if loss_failure else [])]
    return {
        **result,
        "status": "pass" if not failures else "fail",
        "rel_err": report.global_rel_err,
        "reason": "; ".join(failures) or None,
    }


def verification(
    record: RunRecord, is_reference: bool, reference: RunRecord | None, out: Path, rtol: float
) -> dict[str, Any]:
    """The verify object of a finished run (bench.json): the reference's own, an error when the reference
    did not run, else `verify_against`."""
    if is_reference:
        return {
            "status": "reference",
            "rel_err": 0.0,
            "rtol": rtol,
            "reason": None,
            "steps": steps_done(record),
            "max_loss_diff": 0.0,
            "worst_tensor": None,
            "worst_tensor_rel_err": None,
        }
    if reference is None or reference.status != "ok":
        why = reference.reason if reference is not None else "it did not run"
        return {
            "status": "error",
            "rel_err": None,
            "rtol": rtol,
            "reason": f"the reference failed: {why}",
            "steps": steps_done(record),
            "max_loss_diff": None,
            "worst_tensor": None,
            "worst_tensor_rel_err": None,
        }
    return verify_against(record, reference, out, rtol)
