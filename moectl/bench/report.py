"""What `moectl bench` shows: the console table and the optional `bench.png`.

Both read the bench.json payload (moectl/bench/record.py; its schema is in the README), so they can be
redrawn from a saved file. matplotlib is an optional extra (`pip install 'moectl[plot]'`); without it the plot is skipped with
one line, never an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from moectl.io.outputs import save_figure_atomic
from moectl.model.sizing import format_mfu
from moectl.tables import Column, show_table

PLOT_SKIPPED = "plot skipped: matplotlib is not installed; pip install 'moectl[plot]' to get bench.png"


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def _step_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _status(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return {"failed": "[red]failed[/red]", "skipped": "[yellow]skipped[/yellow]"}.get(
            row["status"], row["status"]
        )
    verify = row.get("verify")
    if verify is None:
        return "[green]ok[/green]"
    return {
        "pass": "[green]pass[/green]",
        "reference": "[cyan]reference[/cyan]",
        "fail": "[red]FAIL[/red]",
        "error": "[red]not verified[/red]",
    }[verify["status"]]


def describe_record(record: Any) -> str:
    """One progress line after a run: its outcome, speed and verification."""
    if record.status != "ok":
        return f"{record.status}: {record.reason}"
    parts = [
        f"ok in {record.wall_s:.1f} s",
        f"{_number(record.tokens_per_s_per_device, ',.0f')} tok/s/device",
        f"MFU {format_mfu(record.mfu)}",
        f"final loss {_number(record.final_loss, '.4f')}",
    ]
    if record.verify:
        verify = record.verify
        if verify["status"] in ("pass", "fail"):
            parts.append(
                f"after {verify['steps']} steps: rel err {verify['rel_err']:.2e}, "
                f"max Δloss {_number(verify['max_loss_diff'], '.1e')} {verify['status']}"
            )
        elif verify["status"] == "error":
            parts.append(f"not verified: {verify['reason']}")
    return " · ".join(parts)


def print_table(payload: dict[str, Any], console: Console) -> None:
    settings, verify = payload["settings"], payload["verify"]
    title = (
        f"moectl bench: {settings['steps']} steps ({settings['warmup_steps']} warm-up, not timed), "
        f"global batch {settings['global_batch']} × {settings['seq_len']} tokens, "
        f"{settings['device']}, {settings['precision']} precision"
    )
    caption = (
        f"reference: {verify['reference']} ({verify['reference_why']}); weights compared after the "
        f"steps shown; pass = ‖w − w_ref‖/‖w_ref‖ ≤ {verify['rtol']:g} and, at every step, "
        f"|loss − loss_ref| ≤ {verify['rtol']:g} · max(1, loss_ref)"
        if verify["enabled"]
        else "not verified (add --verify to compare weights and losses with the reference)"
    )
    headers = ("strategy", "world", "tok/s", "tok/s/device", "MFU", "MFU seed", "step time", "peak mem")
    headers += ("steps", "final loss", "rel err", "max Δloss", "status")
    columns = [Column(h, "left" if h in ("strategy", "status") else "right") for h in headers]
    rows, notes = [], []
    for row in payload["rows"]:
        verify_row = row.get("verify") or {}
        rel_err = verify_row.get("rel_err")
        rows.append(
            [
                Text(row["name"]),
                str(row["world_size"] or row["nproc"]),
                _number(row["tokens_per_s"], ",.0f"),
                _number(row["tokens_per_s_per_device"], ",.0f"),
                format_mfu(row["mfu"]) if row["status"] == "ok" else "—",
                format_mfu(row["mfu_seed"]) if row["status"] == "ok" else "—",
                _step_time(row["median_step_time_s"]),
                _number(row["peak_mem_gib"], ".2f", " GiB"),
                str(row["loss_curve"][-1]["step"]) if row["loss_curve"] else "—",
                _number(row["final_loss"], ".4f"),
                "—" if rel_err is None or verify_row["status"] == "reference" else f"{rel_err:.2e}",
                "—"
                if verify_row.get("max_loss_diff") is None or verify_row["status"] == "reference"
                else f"{verify_row['max_loss_diff']:.1e}",
                _status(row),
            ]
        )
        if row["status"] != "ok":
            notes.append(f"{row['name']} {row['status']}: {row['reason']}")
        elif verify_row.get("status") in ("fail", "error"):
            notes.append(f"{row['name']} not verified: {verify_row['reason']}")
    show_table(console, columns, rows, title=title, caption=caption)
    reference_run = verify.get("reference_run")
    if reference_run and reference_run["status"] != "ok":
        notes.insert(0, f"reference {reference_run['name']} failed: {reference_run['reason']}")
    for note in notes:
        console.print(f"  • {note}", highlight=False, markup=False)


def write_plot(payload: dict[str, Any], path: Path, console: Console) -> bool:
    """bench.png: tokens/s per device, MFU (both formulas; left out where no device peak is known) and
    the loss curves; False when skipped."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        console.print(PLOT_SKIPPED, highlight=False, markup=False)
        return False
    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    names = [r["name"] for r in rows]
    # MFU needs the device's peak FLOP/s: without it (the CPU) the panel would be empty, so it is left out.
    has_mfu = any(r["mfu"] is not None for r in rows)
    figure = Figure(figsize=(16 if has_mfu else 11, 4.8), layout="constrained")
    panels = figure.subplots(1, 3 if has_mfu else 2)
    speed, loss = panels[0], panels[-1]

    speed.bar(names, [r["tokens_per_s_per_device"] or 0 for r in rows], color="tab:blue")
    speed.set_title("tokens/s per device (median after warm-up)")
    speed.set_ylabel("tokens / s / device")

    if has_mfu:
        efficiency = panels[1]
        positions = range(len(rows))
        width = 0.4
        efficiency.bar([p - width / 2 for p in positions], [100 * (r["mfu"] or 0) for r in rows], width)
        efficiency.bar([p + width / 2 for p in positions], [100 * (r["mfu_seed"] or 0) for r in rows], width)
        efficiency.set_xticks(list(positions), names)
        efficiency.legend(["MFU (6·N_matmul + attention)", "MFU seed (6·N_active)"])
        efficiency.set_ylabel("% of peak bf16 FLOP/s")
        efficiency.set_title("MFU by strategy")
        efficiency.tick_params(axis="x", labelrotation=30)

    reference = payload["verify"]["reference_run"]
    markers = "osD^vP*X"
    for number, row in enumerate(rows + ([reference] if reference and reference["status"] == "ok" else [])):
        curve = [p for p in row["loss_curve"] if p["loss"] is not None]
        # Strategies that match trace the same curve: distinct markers keep each one visible.
        style = {"linestyle": "--", "color": "black"} if row is reference else {"alpha": 0.8}
        loss.plot(
            [p["step"] for p in curve],
            [p["loss"] for p in curve],
            label=row["name"],
            marker=markers[number % len(markers)],
            markersize=4,
            **style,
        )
    loss.set_title("training loss")
    loss.set_xlabel("step")
    loss.xaxis.get_major_locator().set_params(integer=True)
    if rows:
        loss.legend()
    speed.tick_params(axis="x", labelrotation=30)

    save_figure_atomic(figure, path)
    console.print(f"plot: {path}", highlight=False)
    return True
