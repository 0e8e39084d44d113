"""Small markdown helpers shared by every report (``convcg ablate``, the benchmarks).

Pure string functions: no I/O, no MLflow. One table renderer, so every report escapes and aligns the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence


def escape_cell(value: object) -> str:
    """A table cell's text: pipes escaped and newlines folded, so one value stays one cell.

    Example:
        >>> escape_cell("a|b\\nc")
        'a\\\\|b c'
    """
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table.

    Args:
        headers: column titles.
        rows: cell values, one sequence per row, as many cells as ``headers``.
        align: one character per column, ``l`` (default) or ``r``; e.g. ``"lrr"``.

    Example:
        >>> print(table(["variant", "recall"], [["a", "0.5"]], align="lr"))
        | variant | recall |
        |---|---:|
        | a | 0.5 |
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns.")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(escape_cell(h) for h in headers) + " |", rule]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {list(row)!r}.")
        lines.append("| " + " | ".join(escape_cell(c) for c in row) + " |")
    return "\n".join(lines)
