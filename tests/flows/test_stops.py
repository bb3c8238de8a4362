"""SIGTERM and SIGINT stop a command within 10 s, with its processes gone, and a rerun resumes."""

from __future__ import annotations

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

from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
STOP_WITHIN_S = 10


@pytest.fixture(scope="module")
def user_prefect_home(tmp_path_factory) -> Path:
    """A PREFECT_HOME for the commands that start their own temporary server, shared by this
    module's tests as a user's ~/.prefect is by their commands: only the first creates its
    database (about 20 s here)."""
    return tmp_path_factory.mktemp("prefect-home")


def own_api_env(home: Path) -> dict[str, str]:
    """The environment of a user's command: no PREFECT_API_URL (it starts a temporary server), ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _start(words: list[str], tmp_path: Path, own_api: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """The real command line in a session of its own (so that what it leaves running can be found);
    its stderr goes to a file. ``own_api``: the PREFECT_HOME of a command without PREFECT_API_URL,
    which starts its own temporary Prefect server, as a user's command does."""
    from prefect.settings import PREFECT_API_URL

    log = tmp_path / "stderr.txt"
    env = own_api_env(own_api) if own_api else {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    code = "from cxr_miner.flows.cli import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *words],
        stderr=log.open("w"),
        stdout=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    return process, log


def _wait_for(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{text!r} never came:\n{log.read_text()}"
        time.sleep(0.2)


def _stop(process: subprocess.Popen, signum: int, group: bool = False) -> float:
    """Send ``signum`` (``group``: to the command's whole process group, as ``timeout`` and a
    terminal's Ctrl-C do); return the seconds until the process ended."""
    sent = time.monotonic()
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    process.wait(timeout=60)
    return time.monotonic() - sent


def _left_running(session: int) -> list[str]:
    """Processes still alive in the command's session (Dask workers, API server, DataLoader workers)."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.info["pid"]) == session and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.info["cmdline"] or []))
        except (ProcessLookupError, psutil.Error):
            continue
    return left


def _stops_cleanly(process: subprocess.Popen, log: Path, signum: int, group: bool = False) -> None:
    """``signum`` ends the command within STOP_WITHIN_S with exit 128 + signum, one line, nothing left
    running: neither in its session nor among the processes it had started (the Prefect server has a
    session of its own)."""
    children = psutil.Process(process.pid).children(recursive=True)
    took = _stop(process, signum, group)
    told = log.read_text()
    assert process.returncode == 128 + signum, told
    assert took < STOP_WITHIN_S, took
    assert f"stopped: stopped by {signal.Signals(signum).name}" in told and "Traceback" not in told
    assert "| ERROR" not in told and "internal error" not in told
    time.sleep(1)
    assert _left_running(process.pid) == []
    assert [c.pid for c in children if _alive(c)] == []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_sigterm_to_the_process_group_stops_training_mid_epoch_and_the_rerun_resumes(
    trained_workdir, tmp_path, user_prefect_home
):
    """As ``timeout`` sends it: to the command, its loader workers and (unless it leaves the group)
    its temporary Prefect server at once. A server killed first made every report retry for minutes."""
    work = copy_workdir(trained_workdir, tmp_path / "w")
    config = tmp_path / "long.json"
    config.write_text(
        json.dumps(
            {
                "epochs": 40,
                "am_steps": 1,
                "loader_workers": 1,
                "input_size": 64,
                "model": {"trunk": "resnet10", "stages": 3},
            }
        )
    )  # short epochs: the test is of stopping
    words = ["train", "--workdir", str(work), "--run", "long", "--config", str(config), "--method", "cam"]
    process, log = _start(words, tmp_path, own_api=user_prefect_home)
    metrics = work / "models" / "long" / "metrics.json"
    while not metrics.exists():  # one epoch done: its checkpoint is written, then its metrics
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)
    time.sleep(1)  # mid-epoch
    _stops_cleanly(process, log, signal.SIGTERM, group=True)
    assert not list(work.rglob("*.tmp"))
    epochs_done = len(json.loads(metrics.read_text())["step1"])
    assert epochs_done >= 1

    again, log = _start(words, tmp_path)
    _wait_for(log, f"step1: resuming after epoch {epochs_done} from ", again)
    assert _stop(again, signal.SIGTERM) < STOP_WITHIN_S and again.returncode == 143


def test_sigint_stops_a_dask_preprocess_and_the_rerun_on_its_own_api_accounts_for_every_image(
    trained_workdir, tmp_path, user_prefect_home
):
    work = copy_workdir(trained_workdir, tmp_path / "w")
    words = [
        "preprocess",
        "--workdir",
        str(work),
        "--size",
        "96",
        "--shard-size",
        "8",
        "--workers",
        "2",
        "--encoding",
        "png",
    ]
    process, log = _start(words, tmp_path)
    _wait_for(log, "Creating a new Dask cluster", process)
    time.sleep(3)
    _stops_cleanly(process, log, signal.SIGINT)
    if "cleanup cut short" not in log.read_text():  # the watchdog's stop may leave a killed worker's .tmp
        assert not list((work / "shards").glob("*.tmp"))

    # The rerun as a user's command: without PREFECT_API_URL it starts one temporary API, and its Dask
    # workers use it (a worker with a server of its own would log its own start and stop).
    rerun = subprocess.run(
        [sys.executable, "-c", "from cxr_miner.flows.cli import main; main()", *words],
        capture_output=True,
        text=True,
        env=own_api_env(user_prefect_home),
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    output = rerun.stdout + rerun.stderr
    assert output.count("Starting temporary server") == output.count("Stopping temporary server") == 1, output[-3000:]
    assert "Error logging to API" not in output
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    index_rows = pq.read_metadata(work / "index.parquet").num_rows
    assert (
        manifest["counts"]["shard_rows"] + manifest["counts"]["quarantined"] + manifest["counts"]["missing"]
        == index_rows
    )
    assert manifest["settings"]["size"] == 96
    assert not list((work / "shards").glob("*.tmp"))


CLEANUP_THAT_HANGS = """
import subprocess, sys, time
from cxr_miner.flows.stopping import stop_on_signals
with stop_on_signals(grace_s=0.5):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    try:
        time.sleep(60)
    finally:
        time.sleep(60)  # cleanup stuck, as on a Dask worker that never answers
"""


def test_a_stop_whose_cleanup_hangs_is_ended_by_the_watchdog_with_its_line_and_children_killed():
    process = subprocess.Popen(
        [sys.executable, "-c", CLEANUP_THAT_HANGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    child = psutil.Process(int(process.stdout.readline()))
    took = _stop(process, signal.SIGINT)
    assert process.returncode == 130 and took < 5, took
    told = process.stderr.read()
    assert "stopped: stopped by SIGINT; cleanup cut short after 0.5 s, its processes killed" in told, told
    time.sleep(0.5)
    assert not _alive(child)


def _helpers_ready(process: subprocess.Popen, log: Path, kinds: tuple[str, ...], timeout_s: float = 180) -> list:
    """Wait until the command runs a helper of each kind (a substring of its command line); its
    descendants then."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"helpers {kinds} never all started:\n{log.read_text()}"
        children = psutil.Process(process.pid).children(recursive=True)
        lines = [" ".join(c.cmdline()) for c in children if _alive(c)]
        if all(any(kind in line for line in lines) for kind in kinds):
            return children
        time.sleep(0.2)


@pytest.mark.parametrize("command", ["demo-data", "preprocess", "train"])
def test_kill_9_of_a_command_leaves_none_of_its_processes_within_10_s(
    command, trained_workdir, tmp_path, user_prefect_home
):
    """Nothing runs in a SIGKILLed command to stop its helpers: the phantom generator's pool, the
    temporary Prefect server (a session of its own), Dask's workers and loader workers must each
    end by themselves (storage.vocab.lifetime; the server lived on with parent 1 for 23 minutes)."""
    config = tmp_path / "long.json"
    config.write_text(json.dumps({"epochs": 40, "am_steps": 1, "loader_workers": 1, "input_size": 64}))
    work = copy_workdir(trained_workdir, tmp_path / "w") if command != "demo-data" else tmp_path / "w"
    words, helpers = {
        "demo-data": (["demo-data", str(tmp_path / "nih"), "--images", "4000", "--size", "512", "--workers", "2"],
                      ("demo-data",)),
        "preprocess": (["preprocess", "--workdir", str(work), "--size", "96", "--shard-size", "4", "--workers", "2"],
                       ("uvicorn", "spawn_main")),
        "train": (["train", "--workdir", str(work), "--run", "k", "--config", str(config), "--method", "cam"],
                  ("uvicorn", "spawn_main")),
    }[command]  # fmt: skip
    process, log = _start(words, tmp_path, own_api=user_prefect_home)
    children = _helpers_ready(process, log, helpers)
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + STOP_WITHIN_S
    while (left := [" ".join(c.cmdline()) for c in children if _alive(c)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], left
