"""Dask's preload module for local workers (flows.dask.LOCAL_WORKER_CONFIG): what each worker process
sets up before its first task. Light on purpose: it imports nothing a preprocess worker does not need."""

from __future__ import annotations

import logging

# What Dask logs, with a traceback, when the other end of a connection has gone: a stopped command
# closes its scheduler while workers still talk to it, and the scheduler its comms while they still send.
SHUTDOWN_MESSAGES = {
    "distributed.worker": "Failed to communicate with scheduler during heartbeat",
    "distributed.batched": "Batched Comm Closed",
}


class _OneLineShutdown(logging.Filter):
    """The command line shows errors as one line: keep the message of Dask's shutdown noise
    (SHUTDOWN_MESSAGES), drop its traceback."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith(self.message):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_dask_shutdown() -> None:
    """Install the filters of SHUTDOWN_MESSAGES in this process, once."""
    for name, message in SHUTDOWN_MESSAGES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _OneLineShutdown) for f in log.filters):
            log.addFilter(_OneLineShutdown(message))


def dask_setup(worker: object) -> None:
    """Dask's preload hook, run in every local worker process (LOCAL_WORKER_CONFIG)."""
    quiet_dask_shutdown()
    from cxr_miner.flows.logs import hold_prefect_errors

    hold_prefect_errors()  # a failed task is reported by the command, in its one line
