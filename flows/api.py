"""One Prefect API for a block of flow runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cxr_miner.flows.stopping import Stopped
from cxr_miner.storage.vocab.lifetime import die_with_this_process

# Prefect's default (20 s) is too short for a first start, which creates and migrates the
# database: about 15 s on 2 idle cores, more under load.
STARTUP_TIMEOUT_S = 120


def detached_server():  # -> prefect's SubprocessASGIServer
    """Prefect's temporary API server, started in a process session of its own: a signal sent to
    the command's whole process group (Ctrl-C in a terminal, ``timeout``, a scheduler's stop) then
    reaches the command, which stops the server last, after the runs have reported their end. In
    the command's group the server died first, and every report after it retried for minutes.

    The server dies with the command however the command ends, ``kill -9`` included: it asks the
    kernel for a SIGKILL when the command's thread that started it ends (storage.vocab.lifetime;
    Linux). Without that it lived on with parent 1, holding its port."""
    import subprocess
    from functools import partial
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer

    class DetachedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            detached = partial(subprocess.Popen, start_new_session=True, preexec_fn=die_with_this_process())
            with mock.patch.object(subprocess, "Popen", detached):
                return super()._run_uvicorn_command()

    return DetachedServer()


@contextmanager
def prefect_api() -> Iterator[str]:
    """The configured PREFECT_API_URL, else one temporary local server for the whole block.

    Without it, every top-level flow run in ephemeral mode starts (and stops) its own
    server, about 15 s each, and so does every Dask worker process, whose task runs then
    report to an API nobody reads.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    # The server's SQLite file lives in PREFECT_HOME; a missing parent folder would
    # otherwise show up only as a start-up timeout.
    PREFECT_HOME.value().mkdir(parents=True, exist_ok=True)
    server = detached_server()
    server.start(timeout=max(STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            drain_timeout = 10.0
            try:
                yield server.api_url
            except Stopped:
                drain_timeout = 1.0  # a stop must be quick; what is not sent by then is let go
                raise
            finally:
                _drain_to_api(drain_timeout)
    finally:
        server.stop()


def _drain_to_api(timeout: float = 10.0) -> None:
    """Send the logs and events still queued before the API goes away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout, at_exit=False)
    EventsWorker.drain_all(timeout=timeout, at_exit=False)
