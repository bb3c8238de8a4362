"""Dask's preload module for local workers (flows.dask.LOCAL_WORKER_CONFIG): what each worker process
sets up before its first task. Light on purpose: it imports nothing a preprocess worker does not need."""

from __future__ import annotations

import logging

HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat"


class _OneLineHeartbeatLoss(logging.Filter):
    """A worker whose scheduler has gone (a stopped command closes the scheduler first) logs the lost
    heartbeat with a traceback; the command line shows errors as one line, so keep only the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith(HEARTBEAT_LOST):
            record.exc_info, record.exc_text = None, None
        return True


def dask_setup(worker: object) -> None:
    """Dask's preload hook, run in every local worker process (LOCAL_WORKER_CONFIG)."""
    log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _OneLineHeartbeatLoss) for f in log.filters):
        log.addFilter(_OneLineHeartbeatLoss())
    from cxr_miner.flows.logs import hold_prefect_errors

    hold_prefect_errors()  # a failed task is reported by the command, in its one line
