"""Errors about input data that name the file, the row and the value."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input that stops a stage: says where (file, line) and what (value)."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
