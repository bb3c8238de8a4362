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


class NoSpaceLeft(UserError):
    """The disk of ``folder`` filled up while a command wrote ``what`` there; what was half written
    is removed. The message names the folder, its free space now, and what to do."""

    def __init__(self, folder: str | Path, what: str, rerun: str) -> None:
        free = _free_bytes(Path(folder))
        left = f" ({free / 2**20:.0f} MiB free now)" if free is not None else ""
        super().__init__(
            f"{folder}: no space left on its disk while writing {what}{left}; nothing of it was kept: "
            f"free some space and run `{rerun}` again"
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for want of space (ENOSPC, or pyarrow's wording of it)."""
    import errno

    return isinstance(error, OSError) and (error.errno == errno.ENOSPC or "No space left on device" in str(error))


def _free_bytes(folder: Path) -> int | None:
    import shutil

    for path in (folder, *folder.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None
