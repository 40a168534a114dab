"""The one way the commands and the scripts of bench/ print a table: a header line, then a
line per row, each column as wide as its widest cell."""

from __future__ import annotations

from typing import Collection, Mapping, Sequence


def text_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str], left: Collection[str] = ()) -> str:
    """Each row's values under `columns` (a row lacking one shows '-'), two spaces apart;
    the columns named in `left` aligned left (names, answers), the others right (numbers).
    A float shows three significant digits (no decimals from 1000 on) and None '-': a value
    wanted otherwise is given as the string to show."""
    cells = [list(columns)] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) if column in left else text.rjust(width)
                               for text, width, column in zip(line, widths, columns)).rstrip()
                     for line in cells)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)
