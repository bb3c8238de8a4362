"""Dask's shutdown noise reaches the console as one line, other Dask tracebacks as they are."""

import io
import logging

import pytest

from cxr_miner.flows.workers import SHUTDOWN_MESSAGES, quiet_dask_shutdown


def _logged(name: str, message: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        try:
            raise ConnectionError("Stream is closed")
        except ConnectionError:
            logger.error(message, exc_info=True)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


@pytest.mark.parametrize("name", sorted(SHUTDOWN_MESSAGES))
def test_a_closed_connection_is_logged_in_one_line(name):
    quiet_dask_shutdown()
    quiet_dask_shutdown()  # twice: still one filter
    message = SHUTDOWN_MESSAGES[name] + " <TCP (closed) Scheduler connection to worker>"
    assert _logged(name, message) == message + "\n"
    assert len(logging.getLogger(name).filters) == 1


def test_other_dask_errors_keep_their_traceback():
    quiet_dask_shutdown()
    told = _logged("distributed.batched", "Error in batched write")
    assert "Traceback" in told and "ConnectionError: Stream is closed" in told
