"""Numbers and tables as text, the same in Markdown files, the HTML report and the terminal."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MISSING = "-"  # an undefined figure: NaN (no image evaluated) or None


def format_number(value: Any, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals if it is a float, ``-`` for None or NaN, else ``str(value)``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are formatted with :func:`format_number`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
