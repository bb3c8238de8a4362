"""Clean stops: SIGINT and SIGTERM end a command within seconds, with its cleanup done.

The first signal raises :class:`Stopped` in the main thread. It unwinds like any exception, so
every ``with`` block closes on the way out: the Dask cluster, the temporary Prefect API,
DataLoader workers, temporary files. Prefect's own SIGTERM bridge (which marks the flow run
crashed) re-sends the signal to the handler it replaced, which is this one.

A watchdog started with the first signal makes the stop certain: if the process still lives
``grace_s`` seconds later (cleanup stuck on a dead worker, say), it says so in the stop's one line,
kills the process's children and exits with the same status. What a killed worker leaves (a
temporary file) the rerun removes. Further signals during the stop are ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

GRACE_S = 8.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """The command was asked to stop (a BaseException, like KeyboardInterrupt: nothing swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it (130, 143)."""
        return 128 + self.signum


def kill_children() -> None:
    """SIGKILL every descendant of this process (Dask nannies and workers, the API server)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            child.kill()


def cut_short_line(signum: int, grace_s: float) -> str:
    """The stop's line when the watchdog ends it (the line a clean stop prints, with what differs)."""
    return (
        f"stopped: {Stopped(signum)}; cleanup cut short after {grace_s:g} s, its processes killed;"
        " a rerun removes what is left and resumes\n"
    )


def _watchdog(signum: int, grace_s: float) -> None:
    def kill_and_exit() -> None:
        kill_children()
        if not _reported:  # the clean stop's line is out: the interpreter's teardown ran long, nothing more to say
            # os.write, not print: the main thread may hold sys.stderr's lock where the watchdog fires
            os.write(2, cut_short_line(signum, grace_s).encode())
        os._exit(128 + signum)

    timer = threading.Timer(grace_s, kill_and_exit)
    timer.daemon = True
    timer.start()


_received: list[int] = []  # the signal that started the stop, in this process
_reported: list[bool] = []  # the command has said how it stopped (stop_reported)


def stop_reported() -> None:
    """The stop's line is said: a watchdog firing later (in a long teardown) says nothing more."""
    _reported.append(True)


def stop_requested() -> Stopped | None:
    """The stop under way, if a signal arrived: library code on the way out may have wrapped the
    :class:`Stopped` it raised in an error of its own (pydantic does), so ask this, not the type."""
    return Stopped(_received[0]) if _received else None


@contextmanager
def stop_on_signals(grace_s: float = GRACE_S) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Stopped` (main thread only)."""
    _received.clear()
    _reported.clear()

    def handler(signum: int, frame: object) -> None:
        if _received:
            return
        _received.append(signum)
        _watchdog(signum, grace_s)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
