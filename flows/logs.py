"""Logging tweaks for the command line."""

from __future__ import annotations

import logging

from cxr_miner.storage.vocab.errors import InputError

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class _DropInputErrorTraceback(logging.Filter):
    """Bad input is the user's to fix, not a bug: log its message, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_errors() -> None:
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInputErrorTraceback) for f in logger.filters):
            logger.addFilter(_DropInputErrorTraceback())
