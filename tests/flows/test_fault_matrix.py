"""The fault matrix: a command killed in the middle of ingest, training or a release (no cleanup at
all, like SIGKILL) and run again gives what an undisturbed run gives.

Killed workers in preprocess and harvest are in test_pipeline.py and test_harvest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr_miner.flows.faults import FAULT_ENV, plant_fault
from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
KILLED = 70  # what a process ended by the planted fault exits with


def _cli(words: list[str], fault: Path | None = None) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = str(fault)
    code = "from cxr_miner.flows.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *words], capture_output=True, text=True, env=env, timeout=900)


def _start_cli(words: list[str]) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop(FAULT_ENV, None)
    code = "from cxr_miner.flows.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *words], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )


def _killed(words: list[str], point: str, tmp_path: Path) -> subprocess.CompletedProcess:
    plant_fault(tmp_path / "fault.json", point, "exit")
    killed = _cli(words, tmp_path / "fault.json")
    assert killed.returncode == KILLED, killed.stderr
    assert not (tmp_path / "fault.json").exists()  # the fault fired
    return killed


def _killed_then_rerun(words: list[str], point: str, tmp_path: Path) -> None:
    _killed(words, point, tmp_path)
    rerun = _cli(words)
    assert rerun.returncode == 0, rerun.stderr


def test_ingest_killed_between_its_files(tmp_path, prefect_server):
    from cxr_miner.storage.phantoms.generator import generate

    root = tmp_path / "nih"
    generate(root, n_images=40, size=64, seed=5, box_fraction=0.2)
    calm, hit = tmp_path / "calm", tmp_path / "hit"
    assert _cli(["ingest", str(root), "--workdir", str(calm)]).returncode == 0
    _killed_then_rerun(["ingest", str(root), "--workdir", str(hit)], "ingest", tmp_path)
    for name in ("index.parquet", "gt_boxes.parquet", "ingest_report.json"):
        assert (hit / name).read_bytes() == (calm / name).read_bytes(), name


def _arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def test_training_killed_mid_epoch_resumes_to_the_same_weights(trained_workdir, tmp_path, prefect_server):
    """Step 1 killed in its second epoch, step 2 (attention mining) in its first: the rerun resumes
    each after its last finished epoch, and ends with the weights of an undisturbed run."""
    work = copy_workdir(trained_workdir, tmp_path / "w")
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "epochs": 2,
                "am_steps": 2,
                "am_epochs": 1,
                "loader_workers": 0,
                "input_size": 64,
                "model": {"trunk": "resnet10", "stages": 3},
            }
        )
    )  # small: the test is of resuming, not learning
    words = ["train", "--workdir", str(work), "--config", str(config)]
    assert _cli([*words, "--run", "calm"]).returncode == 0
    _killed([*words, "--run", "hit"], "train-step1-epoch2-batch2", tmp_path)
    second = _killed([*words, "--run", "hit"], "train-step2-epoch1-batch1", tmp_path)
    assert "step1: resuming after epoch 1" in second.stderr
    assert _cli([*words, "--run", "hit"]).returncode == 0
    calm, hit = work / "models" / "calm", work / "models" / "hit"
    for step in ("step1", "step2"):
        ours, theirs = _arrays(hit / f"{step}.safetensors"), _arrays(calm / f"{step}.safetensors")
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{step} {name}")
    losses = {
        run: [e["loss"] for e in json.loads((work / "models" / run / "metrics.json").read_text())["step1"]]
        for run in ("calm", "hit")
    }
    assert losses["hit"] == losses["calm"]


def test_release_killed_before_publishing_leaves_nothing_and_the_rerun_publishes_the_same_boxes(
    released, tmp_path, prefect_server
):
    work = tmp_path / "w"  # the released workdir: evaluated, then harvested with its tuning
    shutil.copytree(released[0], work, ignore=shutil.ignore_patterns("logs", ".cxr-miner.lock"), copy_function=os.link)
    calm, hit = released[1], tmp_path / "hit"  # calm: the undisturbed releases of this very harvest
    plant_fault(tmp_path / "fault.json", "release", "exit")
    killed = _cli(["release", "--workdir", str(work), "--out", str(hit)], tmp_path / "fault.json")
    assert killed.returncode == KILLED, killed.stderr
    assert not (hit / "latest").exists() and [p.name for p in hit.iterdir() if not p.name.startswith(".")] == []
    assert len(list(hit.glob(".staging-*"))) == 1  # what the kill left behind
    assert _cli(["release", "--workdir", str(work), "--out", str(hit)]).returncode == 0
    assert list(hit.glob(".staging-*")) == []
    boxes = [pq.read_table(folder / "latest" / "boxes.parquet") for folder in (calm, hit)]
    assert boxes[0].replace_schema_metadata(None).equals(boxes[1].replace_schema_metadata(None))
    for split in ("train", "val", "test"):
        coco = [json.loads((folder / "latest" / "coco" / f"{split}.json").read_text()) for folder in (calm, hit)]
        assert coco[0]["annotations"] == coco[1]["annotations"] and coco[0]["images"] == coco[1]["images"]

    # Two releases started together into one folder: one waits for nobody and publishes, the other is
    # refused naming it (or, had the first finished before the second began, both publish, each its
    # own version). Either way nothing collides and latest is the newest.
    together = tmp_path / "together"
    started = [_start_cli(["release", "--workdir", str(work), "--out", str(together)]) for _ in range(2)]
    ended = [(process.wait(timeout=600), process.stderr.read()) for process in started]
    statuses = sorted(status for status, _ in ended)
    versions = sorted(p.name for p in together.iterdir() if not p.name.startswith(".") and p.name != "latest")
    if statuses == [0, 2]:
        refused = next(told for status, told in ended if status == 2)
        assert "in use by pid " in refused and f"release --workdir {work} --out {together}" in refused, refused
        assert len(versions) == 1
    else:
        assert statuses == [0, 0] and len(versions) == 2
    assert (together / "latest").resolve().name == versions[-1]
    assert list(together.glob(".staging-*")) == []
