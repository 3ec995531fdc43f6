"""``moectl compare-weights A B`` as a library function: check the input, compare, print, write JSON,
return the exit code."""

from __future__ import annotations

import sys
from pathlib import Path

from moectl.compare.checkpoints import compare_checkpoints
from moectl.compare.render import render_report
from moectl.errors import UsageError
from moectl.io.outputs import check_writable, write_json_atomic
from moectl.tables import output_console

#: the most rows --top shows (the whole report is in --json)
MAX_TOP = 1_000_000


def _check_json_target(json_path: Path) -> None:
    """Where --json will write: a file (new or replaced) in an existing, writable directory."""
    if json_path.is_dir():
        raise UsageError(
            f"--json {json_path} is a directory; pass a file path such as {json_path}/compare.json"
        )
    if json_path.parent.is_file():
        raise UsageError(f"--json {json_path}: {json_path.parent} is a file, not a directory; fix the path")
    if not json_path.parent.is_dir():
        raise UsageError(f"--json {json_path}: directory {json_path.parent} does not exist; create it first")
    check_writable(json_path.parent, "--json path")


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
        if not 0 <= top <= MAX_TOP:
            raise UsageError(
                f"--top must be from 0 to {MAX_TOP:,} (the whole report is in --json), got {top}"
            )
        if json_path is not None:
            _check_json_target(Path(json_path))
        report = compare_checkpoints(
            Path(a), Path(b), rtol=rtol, per_tensor_rtol=per_tensor_rtol, progress=True
        )
    except UsageError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    render_report(report, output_console(), top)
    if json_path is not None:
        try:
            write_json_atomic(Path(json_path), report.to_dict())
        except OSError as exc:
            print(f"error: cannot write --json {json_path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0 if report.matched else 1
