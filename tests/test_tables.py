"""Every table moectl prints (plan, bench, compare-weights, the dry run, the run summary), on an
80-column terminal and piped: no line wider than the terminal, no name broken, nothing left out; piped
output is never wrapped (one line per row)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from moectl.tables import UNBOUNDED_WIDTH, Column, print_rows, show_table
from tests.util import run_moectl_in_process

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: tensor names as long as Qwen3-30B-A3B's longest
LONG_NAMES = [f"model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight" for layer, expert in
              ((0, 0), (47, 127), (12, 3))] + ["model.layers.3.self_attn.q_proj.weight"]  # fmt: skip


def _shown(width: int | None, draw) -> list[str]:
    """What `draw(console)` prints on a terminal of `width` columns (None: piped)."""
    out = io.StringIO()
    if width is None:
        console = Console(file=out, width=UNBOUNDED_WIDTH, color_system=None)
    else:
        console = Console(file=out, width=width, color_system=None, force_terminal=True)
    draw(console)
    return [ANSI.sub("", line).rstrip() for line in out.getvalue().splitlines()]


def _wide_lines(lines: list[str], width: int, beside: int = 8) -> list[str]:
    """Lines wider than the terminal, other than a name longer than the width with at most `beside`
    columns beside it (its row number, its row's label)."""
    return [
        line
        for line in lines
        if len(line) > width and len(line) - max(len(word) for word in line.split()) > beside
    ]


COLUMNS = [Column("#", "right"), Column("tensor"), Column("shape"), Column("dtype"), Column("rel err", "right"),
           Column("max |A−B|", "right"), Column("status")]  # fmt: skip
ROWS = [[str(n), name, "128×768×2048", "BF16", f"{n}.234e-03", f"{n}.5e-04", "over rtol"]
        for n, name in enumerate(LONG_NAMES, 1)]  # fmt: skip


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 200, None])
def test_a_table_fits_any_width_and_keeps_every_cell_whole(width):
    lines = _shown(width, lambda console: show_table(console, COLUMNS, ROWS, title="worst tensors", keys=2))
    if width is not None:
        assert _wide_lines(lines, width) == [], lines
    text = "\n".join(lines)
    for row in ROWS:
        for cell in row[1:]:
            assert any(cell in line for line in lines), (cell, text)  # whole, on one line
    for column in COLUMNS[2:]:
        assert column.header in text
    if width is None or width >= 200:  # room for everything: one line per row, every cell on it
        for row in ROWS:
            assert any(all(cell in line for cell in row) for line in lines), (row, text)


@pytest.mark.parametrize("width", [40, 80, None])
def test_rows_wrap_their_values_at_spaces_under_themselves(width):
    long_path = "/runs/" + "very-long-directory-name/" * 4 + "metrics.jsonl"
    rows = [("model", "Qwen3-MoE, 48 layers, 128 experts (top-8): 30.53 B parameters, 3.35 B active"),
            ("metrics", f"{long_path}, /runs/x/summary.json")]  # fmt: skip
    lines = _shown(width, lambda console: print_rows(console, rows))
    if width is None:
        assert lines == [f"  model    {rows[0][1]}", f"  metrics  {rows[1][1]}"]
        return
    assert _wide_lines(lines, width, beside=12) == [], lines
    assert any(long_path + "," in line for line in lines)  # a path is never split
    assert " ".join(" ".join(lines).split()) == " ".join(f"{name} {value}" for name, value in rows)


def _terminal(monkeypatch, columns: int) -> None:
    """moectl's own consoles see a terminal of `columns` columns."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", str(columns))


def _piped(monkeypatch) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # a width meant for a terminal does not wrap a pipe


@pytest.mark.parametrize("terminal", [True, False])
def test_plan_at_80_columns(terminal, monkeypatch):
    _terminal(monkeypatch, 80) if terminal else _piped(monkeypatch)
    argv = ["plan", "-c", "qwen3-30b-a3b", "--gpus", "8", "--global-batch", "64"]
    result = run_moectl_in_process(*argv)
    assert result.returncode == 0, result.stderr
    lines = [ANSI.sub("", line).rstrip() for line in result.stdout.splitlines()]
    table = lines[: next(i for i, line in enumerate(lines) if line.lstrip().startswith("1. "))]
    plan = json.loads(run_moectl_in_process(*argv, "--json").stdout)
    labels = [row["label"] for row in plan["layouts"]]
    if terminal:
        assert _wide_lines(table, 80) == [], table
        for number, label in enumerate(labels, 1):  # every row, in each part of the split table
            assert sum(bool(re.match(rf"\s*{number}\s+{re.escape(label)}\s", line)) for line in table) >= 2
    else:
        header = next(line for line in table if line.lstrip().startswith("#"))
        assert header.split() == ["#", "strategy", "dp", "tp", "ep", "micro", "AC", "compile", "loss", "chunk",
                                  "tokens/s/GPU", "MFU", "peak", "GiB", "comm", "fits"]  # fmt: skip
        for number, label in enumerate(labels, 1):
            assert sum(bool(re.match(rf"\s*{number}\s+{re.escape(label)}\s", line)) for line in table) == 1
    for number, row in enumerate(plan["layouts"], 1):  # each command whole on its line
        assert f"{number:>3}. {row['does_not_fit'] or row['command']}" in lines


@pytest.fixture(scope="module")
def long_named_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("long-names")
    generator = torch.Generator().manual_seed(0)
    a = {name: torch.randn(4, 4, generator=generator) for name in LONG_NAMES}
    b = {name: tensor + 1e-3 * torch.randn(4, 4, generator=generator) for name, tensor in a.items()}
    save_file(a, str(root / "a.safetensors"))
    save_file(b, str(root / "b.safetensors"))
    return root / "a.safetensors", root / "b.safetensors"


@pytest.mark.parametrize("terminal", [True, False])
def test_compare_weights_never_breaks_a_tensor_name(terminal, long_named_checkpoints, monkeypatch):
    _terminal(monkeypatch, 80) if terminal else _piped(monkeypatch)
    a, b = long_named_checkpoints
    result = run_moectl_in_process("compare-weights", str(a), str(b))
    assert result.returncode == 0, result.stderr
    lines = [ANSI.sub("", line).rstrip() for line in result.stdout.splitlines()]
    for name in LONG_NAMES:
        rows = [line for line in lines if name in line]  # whole, on its own line (or on each part's)
        if terminal:
            assert rows, (name, lines)
        else:  # piped: the whole row on one line
            (line,) = rows
            assert re.search(
                rf"{re.escape(name)}\s+4×4\s+F32\s+\d\.\d{{3}}e-\d\d\s+\d\.\d{{3}}e-\d\d$", line
            ), line
    if terminal:
        assert _wide_lines(lines, 80) == [], lines
        assert sum(bool(re.search(r"\d\.\d{3}e-\d\d", line)) for line in lines) >= 2 * len(LONG_NAMES)


@pytest.mark.parametrize("terminal", [True, False])
def test_bench_table_at_80_columns(terminal):
    from moectl.bench.report import print_table

    def row(name: str) -> dict:
        return {"name": name, "world_size": 4, "nproc": 4, "tokens_per_s": 12345.6, "tokens_per_s_per_device": 3086.4,
                "mfu": 0.412, "mfu_seed": 0.3, "median_step_time_s": 0.0421, "peak_mem_gib": 0.52,
                "loss_curve": [{"step": 40, "loss": 1.2}], "final_loss": 1.2345, "status": "ok", "reason": None,
                "verify": {"status": "pass", "rel_err": 1.2e-7, "max_loss_diff": 3e-7, "reason": None}}  # fmt: skip

    names = ["single", "ddp", "my_expert_parallel_plugin"]
    payload = {
        "settings": {"steps": 40, "warmup_steps": 2, "global_batch": 16, "seq_len": 64, "device": "cpu",
                     "precision": "fp32"},
        "verify": {"enabled": True, "reference": "single", "reference_why": "fits one device", "rtol": 1e-5,
                   "reference_run": None},
        "rows": [row(name) for name in names],
    }  # fmt: skip
    lines = _shown(80 if terminal else None, lambda console: print_table(payload, console))
    figures = [
        "12,346",
        "3,086",
        "41.2%",
        "30.0%",
        "42.1 ms",
        "0.52 GiB",
        "40",
        "1.2345",
        "1.20e-07",
        "3.0e-07",
    ]
    if terminal:
        assert _wide_lines(lines, 80) == [], lines
        for name in names:
            shown = " ".join(line for line in lines if line.startswith(name + " "))
            assert all(figure in shown for figure in figures) and "pass" in shown, (name, lines)
    else:
        for name in names:
            (line,) = [line for line in lines if line.startswith(name + " ")]
            assert line.split()[1:] == ["4", "12,346", "3,086", "41.2%", "30.0%", "42.1", "ms", "0.52", "GiB", "40",
                                        "1.2345", "1.20e-07", "3.0e-07", "pass"]  # fmt: skip


def test_dry_run_at_80_columns(monkeypatch, tmp_path):
    _terminal(monkeypatch, 80)
    data = tmp_path / ("a-long-directory-name-" * 3) / "tokens.bin"
    data.parent.mkdir()
    import numpy as np

    (np.arange(20000) % 128).astype(np.uint16).tofile(data)
    result = run_moectl_in_process(
        "train", "--dry-run", "--data", str(data), "--run-dir", str(tmp_path / "r")
    )
    assert result.returncode == 0, result.stderr
    lines = [ANSI.sub("", line).rstrip() for line in result.stdout.splitlines()]
    assert f"  source: {data}" in lines  # the config's lines are never re-wrapped (it stays YAML)
    estimate = lines.index(next(line for line in lines if line.startswith("single on 1 process")))
    assert _wide_lines(lines[estimate:], 80) == [], lines[estimate:]
    assert any(line.startswith("  memory estimate per rank") for line in lines)
