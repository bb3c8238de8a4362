"""One writer per folder: a refused command names the holder, even when it asks in the instant
between the holder's flock and its writing who it is (two commands started together)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxr_miner.storage.stages.lock import LOCK_FILE, FolderBusy, folder_lock

SLOW_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(0.3)  # the holder's record comes a moment after its lock
os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": "h", "command": "slow", "started": "now"}).encode(), 0)
time.sleep(5)
"""


def test_a_refusal_in_the_instant_before_the_holder_writes_its_record_still_names_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", SLOW_HOLDER, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy, match=f"in use by pid {holder.pid} on h \\(slow, since now\\)"):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path):  # the holder gone, the lock is free again
        pass
