"""The chaos run, short (bench/chaos.py is the long one): ``run`` killed by SIGKILL in its harvest
and stopped by SIGTERM in its release, rerun after each, ends with the release an uninterrupted run
makes, row for row; no process of any of them is left, no temporary file, and the locks are free."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from cxr_miner.storage.stages.lock import LOCK_FILE
from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
GONE_WITHIN_S = 10


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_in(words: list[str], stage: str, signum: int, log: Path) -> int:
    """Start ``words``; once its flow ``stage`` has begun (and 2 s into it), send ``signum`` to the
    command alone; wait until every process it had started is gone (at most GONE_WITHIN_S)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    with log.open("w") as out:
        process = subprocess.Popen(words, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while f"for flow '{stage}'" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(2)
    assert process.poll() is None, log.read_text()[-3000:]
    helpers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signum)
    process.wait(timeout=60)
    gone_by = time.monotonic() + GONE_WITHIN_S
    while [p for p in helpers if _alive(p)] and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert [" ".join(p.cmdline()) for p in helpers if _alive(p)] == []
    return process.returncode


def _lock_free(folder: Path) -> bool:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_run_killed_in_harvest_and_stopped_in_release_ends_with_the_uninterrupted_release(
    released, tmp_path, prefect_server
):
    calm_work, calm_out = released[0], released[1]
    work, out = copy_workdir(calm_work, tmp_path / "w"), tmp_path / "releases"  # trained and evaluated
    root = json.loads((work / "ingest_report.json").read_text())["root"]
    cli = [sys.executable, "-c", "from cxr_miner.flows.cli import main; main()"]
    words = [
        *cli, "run", root, "--workdir", str(work), "--out", str(out), "--preset", "cpu-small",
        "--config", str(work / "settings.json"), "--run", "t", "--size", "128", "--shard-size", "64",
        "--workers", "2",
    ]  # fmt: skip
    assert _kill_in(words, "harvest", signal.SIGKILL, tmp_path / "kill.log") == -signal.SIGKILL
    assert _kill_in(words, "release", signal.SIGTERM, tmp_path / "term.log") == 128 + signal.SIGTERM
    final = subprocess.run(words, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]

    ours, theirs = (
        pq.read_table(o / "latest" / "boxes.parquet").replace_schema_metadata(None) for o in (out, calm_out)
    )
    assert ours.num_rows > 0 and ours.equals(theirs)
    assert [p.name for p in out.iterdir() if p.name.startswith(".staging")] == []
    assert list(work.rglob("*.tmp")) == [] and list(out.rglob("*.tmp")) == []
    assert _lock_free(work) and _lock_free(out)
    stray = [
        p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])
    ]
    assert stray == []
