"""Errors the person running cxr-miner can fix, told apart from bugs.

A :class:`UserError` says what is wrong and where (the file, line and value; the option or
setting; the stage to run first): the command line prints its message alone and exits 2. Any
other exception is a bug, and the command line saves its traceback to a log file it names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UserError(Exception):
    """Something the user can fix: a bad input file, option or setting, or a work folder that is
    not ready for the command. Its message is complete; no traceback is needed to act on it."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled across Dask workers and Prefect's results whatever the subclass's __init__ takes.
        return _rebuilt, (type(self), str(self), self.__dict__)


def _rebuilt(cls: type[UserError], message: str, state: dict[str, Any]) -> UserError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InputError(UserError, ValueError):
    """Bad input that stops a stage: says where (file, line; or the option) and what (value)."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


class SettingError(UserError, ValueError):
    """A setting (a preset's, a settings file's, an option's) that cannot be used; the message
    names the setting, the value and what would do."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the command needs is not there; the message names it and the command
    that makes it (an earlier stage)."""
