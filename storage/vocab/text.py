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


def rule_label(choice: Any) -> str:
    """A tuned choice's box rule for people: its name, and for a ``prior`` rule the box size
    (``box_size``: width and height as fractions of the image), e.g. ``peak-mean-prior (0.035 x 0.036)``."""
    size = choice.get("box_size")
    return choice["rule"] + (f" ({size[0]:.3f} x {size[1]:.3f} of the image)" if size else "")


def ci_text(bounds: Sequence[float | None] | None, digits: int = 2) -> str:
    """ " [low, high]" of a 95% CI, or "" where it is undefined (NaN, or null as JSON keeps NaN)."""
    low, high = bounds or (None, None)
    if low is None or high is None or math.isnan(low):
        return ""
    return f" [{low:.{digits}f}, {high:.{digits}f}]"
