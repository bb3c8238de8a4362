"""Issue 21's hostile user, second pass: no stale release, no NaN in JSON, bad files named as user
errors, bad options refused before anything starts, releases readable by all, one line per error."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cxr_miner.flows.cli import failure_status
from cxr_miner.flows.harvest import run_harvest, why_untuned
from cxr_miner.flows.options import MIN_PATIENTS_PER_FOLD, check_folds
from cxr_miner.flows.release import release
from cxr_miner.storage.releases.release import BOXES_FILE, FILE_MODE, FOLDER_MODE, publish, staging_dir
from cxr_miner.storage.stages.checkpoints import CheckpointError
from cxr_miner.storage.stages.harvest import StaleHarvest, read_harvest_summary
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.errors import InputError
from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "cxr_miner.flows.cli"]


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_harvest_made_before_evaluate_is_never_released(trained_workdir, dask_cluster, tmp_path):
    """Harvest before evaluate: the warning says evaluate has not run and counts the boxed images;
    the release (which evaluates first) refuses the untuned harvest, naming the fix, and publishes nothing."""
    work = copy_workdir(trained_workdir, tmp_path / "work")
    folder = RunFolder.of(work, "t")
    boxed = len(set(pq.read_table(work / "gt_boxes.parquet", columns=["image_id"]).column("image_id").to_pylist()))
    assert boxed > 0
    assert f"evaluate has not run, though {boxed} images have ground-truth boxes" in why_untuned(work, folder)
    harvested = run_harvest(
        str(work), "t", dask_address=dask_cluster, threads=1, splits=("test",)
    )  # a small harvest will do
    assert harvested["key"]["tuning"] is None and not folder.tuning_json.exists()

    with pytest.raises(
        StaleHarvest, match=r"made without a tuning \(evaluate had not run\).* harvest --workdir .* --run t` again"
    ) as refused:
        release(workdir=str(work), out=str(tmp_path / "releases"))
    assert folder.tuning_json.exists()  # evaluate ran, and chose what this harvest did not apply
    assert failure_status(refused.value) == 2
    assert not [p for p in (tmp_path / "releases").iterdir() if not p.name.startswith(".")]
    assert read_harvest_summary(work)["boxes"] == harvested["boxes"]  # the harvest is kept as it was


def test_folds_beyond_the_boxed_patients_are_refused_and_few_per_fold_warned(trained_workdir):
    index = pq.read_table(trained_workdir / "index.parquet", columns=["image_id", "patient_id"]).to_pydict()
    boxed = set(
        pq.read_table(trained_workdir / "gt_boxes.parquet", columns=["image_id"]).column("image_id").to_pylist()
    )
    patients = len({p for i, p in zip(index["image_id"], index["patient_id"]) if i in boxed})
    with pytest.raises(InputError, match=f"{patients + 1} folds, but .* boxes of {patients} patients"):
        check_folds(trained_workdir, patients + 1)
    assert check_folds(trained_workdir, patients) is not None  # one patient a fold: allowed, with a warning
    assert check_folds(trained_workdir, max(2, patients // MIN_PATIENTS_PER_FOLD)) is None
    assert check_folds(trained_workdir, 0) is None


def test_every_json_file_of_a_release_and_its_workdir_is_strict_json(released):
    work, releases, first, _ = released
    files = [*work.rglob("*.json"), *releases.rglob("*.json")]
    names = {p.name for p in files}
    assert {
        "metrics.json",
        "evaluation.json",
        "tuning.json",
        "manifest.json",
        "harvest.json",
        "ingest_report.json",
    } <= names
    for path in files:
        _strict(path.read_text())  # raises on NaN or Infinity
    evaluation = json.loads(RunFolder.of(work, "t").evaluation_json.read_text())
    undefined = [
        cell["acc"]
        for table in evaluation["results"].values()
        for row in table.values()
        for cell in row["iou"].values()
        if cell["acc"] is None
    ]
    assert undefined  # findings without a box-test image: their figures are null, read back as undefined
    assert first["manifest"]["localisation"]["findings"]  # and the release still reads them


def test_releases_are_readable_by_all_and_writable_by_none(released, tmp_path):
    _, _, first, _ = released
    target = Path(first["path"])
    tree = [target, *target.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in tree if p.is_dir()} == {FOLDER_MODE}
    assert {stat.S_IMODE(p.stat().st_mode) for p in tree if p.is_file()} == {FILE_MODE}

    out = tmp_path / "releases"
    out.mkdir()
    staging = staging_dir(out, "20260101T000000Z")
    (staging / "report").mkdir()
    (staging / "report" / "index.html").write_text("x")
    private = publish(staging, out, "20260101T000000Z", private=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o500
    assert stat.S_IMODE((private / "report").stat().st_mode) == 0o500
    assert stat.S_IMODE((private / "report" / "index.html").stat().st_mode) == 0o400


@pytest.fixture
def tuned_copy(released, tmp_path) -> Path:
    """A copy of the released workdir (evaluated and tuned), without its harvest."""
    work, _, _, _ = released
    target = tmp_path / "work"
    shutil.copytree(
        work, target, ignore=shutil.ignore_patterns("harvest", "releases", "logs")
    )  # copies, not links: damaged below
    return target


def test_a_truncated_tuning_is_a_user_error_naming_the_file_and_the_fix(tuned_copy, dask_cluster):
    tuning = RunFolder.of(tuned_copy, "t").tuning_json
    tuning.write_text(tuning.read_text()[:500])
    with pytest.raises(InputError) as refused:
        run_harvest(str(tuned_copy), "t", dask_address=dask_cluster, threads=1)
    assert str(refused.value).startswith(f"{tuning}: damaged: not JSON") and "cxr-miner evaluate" in str(refused.value)
    assert failure_status(refused.value) == 2


def test_a_truncated_checkpoint_is_named_once_before_any_worker_starts(tuned_copy, dask_cluster):
    checkpoint = RunFolder.of(tuned_copy, "t").checkpoint("step3")
    os.truncate(checkpoint, checkpoint.stat().st_size // 2)
    with pytest.raises(CheckpointError) as refused:
        run_harvest(str(tuned_copy), "t", dask_address=dask_cluster, threads=1)
    assert str(refused.value).startswith(f"{checkpoint}: damaged") and "step3-last.safetensors" in str(refused.value)
    assert failure_status(refused.value) == 2
    assert not list((tuned_copy / "harvest" / "parts").glob("*.parquet"))  # no shard was harvested


def test_a_release_without_its_boxes_is_said_to_miss_them(released, tmp_path):
    from cxr_miner.flows.detector_check import checked_release

    work, _, first, _ = released
    copy = tmp_path / "release"
    shutil.copytree(first["path"], copy, ignore=shutil.ignore_patterns(BOXES_FILE))
    with pytest.raises(FileNotFoundError, match=f"{copy / BOXES_FILE}: missing from release"):
        checked_release(copy, work)


@pytest.mark.parametrize(
    "words",
    [
        ["evaluate", "--run", "t", "--box-val-fraction", "2"],
        ["train", "--method", "mil", "--box-fraction", "1.5"],
        ["train", "--method", "mil", "--folds", "1"],
    ],
)
def test_a_bad_option_is_refused_at_once_before_any_server_starts(trained_workdir, tmp_path, words):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # a server would start here
    started = time.monotonic()
    done = subprocess.run(
        [*CLI, *words, "--workdir", str(trained_workdir)], env=env, capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {words[-2]}: {words[-1]}") and done.stderr.count("\n") == 1
    # no server: none is named, and the refusal comes sooner than a temporary server's start (over 10 s here)
    assert "temporary server" not in done.stderr and took < 10, (took, done.stderr)


def test_an_error_inside_a_flow_run_is_one_line_on_the_console(tmp_path, prefect_server):
    """Prefect logs a failed flow run at ERROR; the console shows the command's own line alone,
    which names the log file that keeps Prefect's lines."""
    from prefect.settings import PREFECT_API_URL

    (tmp_path / "models").mkdir()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run(
        [*CLI, "evaluate", "--workdir", str(tmp_path), "--run", "absent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    told = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line or "rror:" in line]
    assert len(told) == 1 and told[0].startswith(
        f"error: {tmp_path / 'models' / 'absent' / 'config.json'}: no such training run"
    )
    (log,) = (tmp_path / "logs").glob("error-*.log")
    assert f"(Prefect's log of it: {log})" in told[0]
    assert "ERROR | prefect.flow_runs - Encountered exception" in log.read_text()
