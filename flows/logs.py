"""Logging for the command line: no tracebacks on the console, the full one in a log file."""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
LOG_DIR = "logs"


class _DropTraceback(logging.Filter):
    """The command line prints one line per error (and writes an internal error's traceback to a
    log file), so Prefect's run loggers keep the message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


class _HoldErrors(logging.Filter):
    """On the console, Prefect's own ERROR lines (a task or flow run failed, with what failed) and its
    line that a run ended failed or crashed are held back: the command says what ended it in one
    line, and the error log keeps these."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("prefect") and (record.levelno >= logging.ERROR or _ended_badly(record)):
            self.held.append(record)
            return False
        return True


def _ended_badly(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return message.startswith("Finished in state") and not message.startswith("Finished in state Completed")


_HOLD = _HoldErrors()
_HELD_FORMAT = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s")


def hold_prefect_errors() -> None:
    """Hold Prefect's ERROR lines back from the console handlers Prefect sets up (see _HoldErrors),
    from now on: those held before (an earlier command in this process) are let go."""
    import prefect.main  # noqa: F401  (sets up Prefect's logging: its console handlers)

    _HOLD.held.clear()
    for name in ("", "prefect", "prefect._internal"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and _HOLD not in handler.filters:
                handler.addFilter(_HOLD)


def held_errors() -> list[str]:
    """The ERROR lines held back from the console so far, formatted as Prefect's console would."""
    return [_HELD_FORMAT.format(record) for record in _HOLD.held]


def quiet_run_tracebacks() -> None:
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTraceback) for f in logger.filters):
            logger.addFilter(_DropTraceback())


def option_value(argv: Sequence[str], option: str) -> str | None:
    """The value of ``--option VALUE`` or ``--option=VALUE`` in a command line, else None."""
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def log_folder(argv: Sequence[str]) -> Path:
    """W/logs for a command with ``--workdir W`` that is a folder, else a folder in the temp dir."""
    workdir = option_value(argv, "--workdir")
    if workdir and Path(workdir).is_dir():
        return Path(workdir) / LOG_DIR
    return Path(tempfile.gettempdir()) / "cxr-miner-logs"


def write_error_log(error: BaseException, argv: Sequence[str]) -> Path:
    """Write the command line, the Prefect error lines held back from the console and ``error``'s
    traceback to a new file; return its path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    held = "".join(f"{line}\n" for line in held_errors())
    text = (
        f"command: {' '.join(argv)}\ntime: {stamp}Z\n\n"
        + (f"Prefect's error lines:\n{held}\n" if held else "")
        + "".join(traceback.format_exception(error))
    )
    for folder in (
        log_folder(argv),
        Path(tempfile.gettempdir()) / "cxr-miner-logs",
    ):  # the work folder may be read-only
        path = folder / f"error-{stamp}-{os.getpid()}.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    raise error
