"""One writer per folder: an advisory lock file naming its holder.

A command that writes into a work folder or a releases folder first takes the folder's lock,
``FOLDER/.cxr-miner.lock``, with ``flock``: the kernel releases it when the holding process
ends, however it ends, so the lock of a dead process is simply free again (the file stays,
with the last holder's details). The file holds the holder's pid, host, command and start
time as JSON, so a refused command can say who holds the folder.

Locks are re-entrant within a process: the ``run`` flow holds the work folder and calls the
stage flows, which take it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from cxr_miner.storage.vocab.errors import InputError

LOCK_FILE = ".cxr-miner.lock"
HOLDER_WAIT_S = 2.0  # how long a refused command waits for the holder's record (holder_text)

_held: dict[Path, tuple[int, int]] = {}  # folder -> (file descriptor, depth), in this process


class FolderBusy(InputError):
    """Another process writes into the folder; names the holder."""


def work_folder(folder: Path) -> Path:
    """``folder``, created if missing; a path that exists and is not a folder raises InputError."""
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is not a folder; give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(folder, "a part of this path is a file, not a folder") from None
    return folder


def read_holder(lock_path: Path) -> dict:
    """The lock file's holder record ({} when empty or unreadable)."""
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def holder_text(lock_path: Path, wait_s: float = HOLDER_WAIT_S) -> str:
    """What the lock file says of its holder, in words. A holder writes its record just after it
    takes the lock: a command refused in that instant (two started together) waits up to
    ``wait_s`` for it rather than name nobody."""
    deadline = time.monotonic() + wait_s
    while not (holder := read_holder(lock_path)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, since {holder.get('started')})"


@contextmanager
def folder_lock(folder: Path, command: str | None = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (creating the folder); raise FolderBusy if another
    process holds it. ``command`` is recorded for the message another command would print."""
    folder = work_folder(Path(folder)).resolve()
    if folder in _held:
        fd, depth = _held[folder]
        _held[folder] = (fd, depth + 1)
        try:
            yield folder
        finally:
            fd, depth = _held[folder]
            _held[folder] = (fd, depth - 1)
        return
    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(folder, f"in use by {holder_text(lock_path)}; wait for it to end, or stop it") from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _held[folder] = (fd, 1)
    try:
        yield folder
    finally:
        if _held[folder][1] == 1:
            del _held[folder]
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock
