"""``moectl compare-weights``' console report."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from moectl.compare.report import CompareReport
from moectl.tables import Column, show_table

_LIST_LIMIT = 10


def _print_names(console: Console, title: str, names: list[str]) -> None:
    if not names:
        return
    console.print(f"[bold red]{title}[/] ({len(names)}):")
    for name in names[:_LIST_LIMIT]:
        console.print(f"  {name}", highlight=False, markup=False, soft_wrap=True)
    if len(names) > _LIST_LIMIT:
        console.print(f"  … and {len(names) - _LIST_LIMIT} more (all in --json)")


def render_report(report: CompareReport, console: Console, top: int = 20) -> None:
    """Print the report: the ``top`` worst tensors as a table, key/shape/dtype problems, the verdict."""
    gigabytes = report.bytes_read / 1e9
    console.print(
        f"A: {report.path_a}\nB: {report.path_b} (reference)\n"
        f"compared {len(report.tensors)} tensors, {gigabytes:.2f} GB in {report.seconds:.1f} s",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if top > 0 and report.tensors:
        shown = report.tensors[:top]
        rows, styles = [], []
        for rank, row in enumerate(shown, start=1):
            over = report.per_tensor_rtol is not None and not row.rel_err <= report.per_tensor_rtol
            dtype = row.dtype_a if row.dtype_a == row.dtype_b else f"{row.dtype_a}/{row.dtype_b}"
            rel = f"{row.rel_err:.3e}"
            if not row.finite:
                rel += f" (non-finite A:{row.nonfinite_a} B:{row.nonfinite_b})"
            shape = "×".join(map(str, row.shape))
            rows.append([str(rank), Text(row.name), shape, dtype, rel, f"{row.max_abs_diff:.3e}"])
            styles.append("red" if over or not row.finite else None)
        show_table(
            console,
            [
                Column("#", "right"),
                Column("tensor"),
                Column("shape"),
                Column("dtype"),
                Column("rel err", "right"),
                Column("max |A−B|", "right"),
            ],  # fmt: skip
            rows,
            title=f"worst {len(shown)} of {len(report.tensors)} tensors",
            keys=2,
            styles=styles,
        )

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
            console.print(
                f"  {name}: A {dtype_a} vs B {dtype_b}", highlight=False, markup=False, soft_wrap=True
            )
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
