"""A helper process dies with the command that started it, however the command dies.

A command's helpers (its temporary Prefect server, the phantom generator's pool, data loader
workers) would outlive a ``kill -9`` of the command: nothing runs in it to stop them, and they go
on with parent 1, holding ports and files. On Linux each asks the kernel, as it starts, for a
SIGKILL when its parent ends (``prctl(PR_SET_PDEATHSIG)``); a parent already gone by then is
caught by comparing ``getppid()`` with the pid it was started by. Dask's worker processes need
none of this: distributed ends them itself when their nanny's pipe closes. Elsewhere than Linux
there is no such signal, and this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl (musl has it; a static build may not)
        return None
    return prctl


def die_with_parent(parent_pid: int | None = None) -> None:
    """In a child process: be sent SIGKILL when the parent ends (Linux), and exit at once if it
    has already ended. ``parent_pid``: the pid the child was started by (default: today's parent,
    which is right whenever this runs first thing in the child)."""
    prctl = _prctl()
    if prctl is None:
        return
    expected = os.getppid() if parent_pid is None else parent_pid
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected:  # the parent ended before the signal was asked for
        os._exit(1)


def die_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess.Popen: the child dies with the process calling this (which
    must make the child from the thread that lives as long as it: the kernel sends the signal
    when the thread that forked ends). Resolved here, so the child runs no ctypes look-up."""
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
