"""Plain aligned text tables for comparison reports."""

from __future__ import annotations

import numbers


def format_cell(value: object) -> str:
    """ints with thousands separators, floats with 4 significant digits, None empty, others str()."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{value:,d}"
    if isinstance(value, numbers.Real):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as a text table: one column per key (in first-seen order), a header, a rule.

    Numbers are right-aligned, everything else left-aligned; a key missing from a row leaves its cell
    empty. Columns are separated by two spaces; lines carry no trailing spaces. An empty list gives "".
    """
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise TypeError("rows must be a list of dicts")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(str(c)), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), numbers.Number) or row.get(c) is None for row in rows) for c in columns]

    def render(values: list[str]) -> str:
        padded = [v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)]
        return "  ".join(padded).rstrip()

    lines = [render([str(c) for c in columns]), render(["-" * w for w in widths])]
    return "\n".join(lines + [render(line) for line in cells]) if rows else ""
