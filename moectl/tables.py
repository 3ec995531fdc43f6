"""Printing tables that never cut or wrap a name: every table moectl prints (plan, bench, compare,
dry-run) goes through `show_table`.

On a terminal a table gets the terminal's width. When its columns do not fit, it is shown as several
narrower tables, each repeating the key columns (the row's name) beside a group of the others; when not
even that fits, each row becomes a block: its key on one line, then `header value` pairs packed into
lines. Output that is not a terminal (a pipe, a file, a log) has no width: tables keep their natural
width and lines are never wrapped, so every row stays one line for grep.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

#: the width of a console that is not a terminal: wider than any line moectl prints
UNBOUNDED_WIDTH = 100_000


def output_console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr) at the terminal's width, or without a width when not a terminal."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = UNBOUNDED_WIDTH
    return console


@dataclass(frozen=True)
class Column:
    header: str
    justify: str = "left"  # or "right", for numbers


Cell = str | Text


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text.from_markup(cell)


def _table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], styles: Sequence[str | None]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=True)  # type: ignore[arg-type]
    for row, style in zip(rows, styles, strict=True):
        table.add_row(*(_text(cell) for cell in row), style=style)
    return table


def _width(console: Console, table: Table) -> int:
    """The table's natural width (rich clamps a measurement to the width it is given)."""
    return Measurement.get(console, console.options.update(max_width=UNBOUNDED_WIDTH), table).maximum


def show_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    *,
    title: str | None = None,
    caption: str | None = None,
    keys: int = 1,
    styles: Sequence[str | None] | None = None,
) -> None:
    """Print `rows` under `columns` in the console's width, nothing cut (see the module docstring).

    `keys`: how many leading columns name a row (repeated in every part of a split table); `styles`: a
    rich style per row (None: plain). Cells may hold rich markup.
    """
    styles = list(styles) if styles is not None else [None] * len(rows)
    if title:
        console.print(title, markup=False, highlight=False)
    whole = _table(columns, rows, styles)
    if _width(console, whole) <= console.width:
        console.print(whole)
    else:
        groups = _column_groups(console, columns, rows, styles, keys)
        if groups:
            for group in groups:
                picked = [*range(keys), *group]
                console.print(
                    _table([columns[i] for i in picked], [[row[i] for i in picked] for row in rows], styles)
                )
        else:
            _print_blocks(console, columns, rows, styles, keys)
    if caption:
        console.print(caption, markup=False, highlight=False)


def _column_groups(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    styles: Sequence[str | None],
    keys: int,
) -> list[list[int]] | None:
    """The non-key columns split into groups, in order, each fitting the width beside the key columns;
    None when the key columns and any one other column do not fit together."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in range(keys, len(columns)):
        candidate = [*current, index]
        picked = [*range(keys), *candidate]
        table = _table([columns[i] for i in picked], [[row[i] for i in picked] for row in rows], styles)
        if _width(console, table) <= console.width:
            current = candidate
        elif current:
            groups.append(current)
            current = [index]
            single = [*range(keys), index]
            table = _table([columns[i] for i in single], [[row[i] for i in single] for row in rows], styles)
            if _width(console, table) > console.width:
                return None
        else:
            return None
    if current:
        groups.append(current)
    return groups


def _print_blocks(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    styles: Sequence[str | None],
    keys: int,
) -> None:
    """Each row as its key cells on one line, then `header value` pairs packed into indented lines."""
    indent = "    "
    for row, style in zip(rows, styles, strict=True):
        console.print(Text("  ").join(_text(cell) for cell in row[:keys]), style=style or "", soft_wrap=True)
        line = Text(indent)
        for column, cell in zip(columns[keys:], row[keys:], strict=True):
            pair = Text(f"{column.header} ") + _text(cell)
            if line.cell_len > len(indent) and line.cell_len + 3 + pair.cell_len > console.width:
                console.print(line, style=style or "", soft_wrap=True)
                line = Text(indent)
            line += Text(" · ") + pair if line.cell_len > len(indent) else pair
        if line.cell_len > len(indent):
            console.print(line, style=style or "", soft_wrap=True)


def print_rows(console: Console, rows: Sequence[tuple[str, str]], indent: int = 2) -> None:
    """`name  value` rows with the names aligned. A value too long for the terminal continues on the
    next lines under itself, broken at spaces only (a path or a name is never split); output that is
    not a terminal keeps each row on one line."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        prefix = f"{' ' * indent}{name:<{width}}  "
        room = console.width - len(prefix)
        lines = textwrap.wrap(value, width=max(room, 20), break_long_words=False, break_on_hyphens=False)
        lines = lines if len(prefix) + len(value) > console.width and lines else [value]
        for number, line in enumerate(lines):
            head = prefix if number == 0 else " " * len(prefix)
            console.print(head + line, markup=False, highlight=False, soft_wrap=True)
