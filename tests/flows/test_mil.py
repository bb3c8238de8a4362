"""The MIL patch model (Li et al. 2018) end to end on phantoms: training from labels and boxes,
which boxed images each model may learn from, evaluate's tables and K-fold cross-validation,
and a harvest and release by ``mil``.

Whether boxes teach the model to localise (the paper's Figure 5: Acc against the box fraction) is a
learning run: bench/mil_fractions.py, figures in BENCHMARKS.md ("MIL"). Here each model trains one
epoch: what is checked is what each learns from and what evaluate, harvest and release make of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr_miner.flows.engine.mil_training_set import mil_training_set, patients_of
from cxr_miner.flows.engine.checkpoints import read_config
from cxr_miner.flows.evaluate import evaluate
from cxr_miner.flows.harvest import run_harvest
from cxr_miner.flows.release import release
from cxr_miner.flows.train import train
from cxr_miner.storage.stages.batches import read_row_group
from cxr_miner.storage.stages.box_splits import BOX_TEST, box_folds, box_splits
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.index import GT_BOXES_FILE, read_gt_boxes
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.errors import InputError
from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
MIL_SETTINGS = {
    "mil_epochs": 1,
    "mil_lr": 4e-3,
    "batch_size": 16,
    "loader_workers": 0,
    "model": {"trunk": "resnet10", "stages": 3},
}  # loader workers: see helpers.SETTINGS; the trunk: a small one (no test here is of learning)


@pytest.fixture(scope="module")
def mil_work(trained_workdir, tmp_path_factory) -> Path:
    """The shared phantoms with two MIL runs, both evaluated and neither for release: ``boxes``
    (box-val's boxes) and ``none`` (box fraction 0)."""
    work = copy_workdir(trained_workdir, tmp_path_factory.mktemp("mil") / "work")
    settings = work / "mil.json"
    settings.write_text(json.dumps(MIL_SETTINGS))
    for run, fraction in (("boxes", 1.0), ("none", 0.0)):
        train(
            workdir=str(work),
            preset="cpu-small",
            config_file=str(settings),
            run=run,
            method="mil",
            box_fraction=fraction,
            for_release=False,
        )
        evaluate(workdir=str(work), run=run)
    return work


def test_each_model_learns_only_from_the_boxes_it_may_and_never_sees_box_test(mil_work):
    truth = read_gt_boxes(mil_work / GT_BOXES_FILE)
    patients, _ = patients_of(mil_work)
    halves = box_splits(patients, sorted(truth))
    box_val = {i for i, h in halves.items() if h != BOX_TEST}
    boxed = read_checkpoint_record(RunFolder.of(mil_work, "boxes").checkpoint("mil"))["boxes"]
    assert (boxed["pool_images"], boxed["boxed_images"], boxed["held_out_images"]) == (
        len(box_val),
        len(box_val),
        len(truth) - len(box_val),
    )
    none = read_checkpoint_record(RunFolder.of(mil_work, "none").checkpoint("mil"))["boxes"]
    assert (none["pool_images"], none["boxed_images"]) == (len(box_val), 0)
    assert not RunFolder.of(mil_work, "boxes").checkpoint("mil-all").exists()  # not for release
    plan = mil_training_set(mil_work, read_config(RunFolder.of(mil_work, "boxes")), "mil")
    trained_on = {i for g in plan.pool_groups for i in read_row_group(g).meta["image_id"]}
    assert trained_on and trained_on <= box_val and set(plan.boxes) == box_val


def test_evaluate_scores_mil_in_the_same_tables_and_tunes_its_rule(mil_work):
    report = json.loads(RunFolder.of(mil_work, "boxes").evaluation_json.read_text())
    assert list(report["results"]) == ["mil", "released"] and "mil" in report["max_box_acc_v2"]
    assert "region-patches" in report["box_rules"]["mil"]
    # the method's own figures are its region rule's
    assert report["results"]["mil"]["Cardiomegaly"] == report["box_rules"]["mil"]["region-patches"]["Cardiomegaly"]
    auc = read_checkpoint_record(RunFolder.of(mil_work, "boxes").checkpoint("mil"))["metrics"]["auc"]
    assert report["validation_auc"] == {
        "mil": {f: None if math.isnan(v) else v for f, v in auc.items()}
    }  # JSON's null: undefined
    markdown = RunFolder.of(mil_work, "boxes").evaluation_md.read_text()
    finite = next(f for f, v in auc.items() if not math.isnan(v))
    assert "| finding | mil |" in markdown and f"| {finite} | {auc[finite]:.3f} |" in markdown
    tuning = json.loads(RunFolder.of(mil_work, "boxes").tuning_json.read_text())
    assert {entry["method"] for entry in tuning["findings"].values()} == {"mil"}


def test_folds_hold_out_each_fold_and_evaluate_reports_their_mean_and_spread(mil_work):
    settings = mil_work / "mil-folds.json"
    settings.write_text(json.dumps({**MIL_SETTINGS, "loader_workers": 1}))  # patch labels made in a spawned worker
    train(
        workdir=str(mil_work),
        preset="cpu-small",
        config_file=str(settings),
        run="folds-v1.2",
        method="mil",
        folds=2,
        for_release=False,
    )  # a run name with a dot: Prefect's artifact keys take none
    folder = RunFolder.of(mil_work, "folds-v1.2")
    assert not folder.checkpoint("mil").exists() and not folder.checkpoint("mil-all").exists()
    truth = read_gt_boxes(mil_work / GT_BOXES_FILE)
    folds = box_folds(patients_of(mil_work)[0], sorted(truth), 2)
    for k in (1, 2):
        record = read_checkpoint_record(folder.checkpoint(f"mil-fold{k}"))["boxes"]
        assert record["held_out_images"] == sum(f == k - 1 for f in folds.values())
    report = evaluate(workdir=str(mil_work), run="folds-v1.2")
    summary = report["folds"]
    assert summary["folds"] == 2 and "2-fold cross-validation" in report["markdown"]
    for finding, row in summary["mean"].items():
        accs = [fold[finding]["iou"][0.3]["acc"] for fold in summary["per_fold"] if fold[finding]["images"]]
        assert row["images"] == sum(fold[finding]["images"] for fold in summary["per_fold"])
        if accs:
            assert row["iou"][0.3]["acc"] == pytest.approx(np.mean(accs))
            sd = summary["sd"][finding]["iou"][0.3]["acc"]
            assert (math.isnan(sd) and len(accs) < 2) or sd == pytest.approx(np.std(accs, ddof=1))


def test_box_options_are_refused_for_methods_that_learn_no_boxes(mil_work):
    with pytest.raises(InputError, match="method .am. learns from none .those that do: --method mil"):
        train(workdir=str(mil_work), preset="cpu-small", run="am-boxes", method="am", box_fraction=0.5)


def test_a_mil_run_is_not_scored_at_a_box_split_it_learnt_across(mil_work):
    with pytest.raises(ValueError, match="learnt from the boxes of box-val at 0.5"):
        evaluate(workdir=str(mil_work), run="boxes", box_val_fraction=0.4)


def test_harvest_and_release_by_mil_use_the_model_of_every_box(mil_work, dask_cluster, tmp_path):
    """A run for release also learns mil-all from every boxed image, and harvest and release use it."""
    settings = mil_work / "mil.json"
    train(workdir=str(mil_work), preset="cpu-small", config_file=str(settings), run="release", method="mil")
    folder = RunFolder.of(mil_work, "release")
    everything = read_checkpoint_record(folder.checkpoint("mil-all"))["boxes"]
    assert (everything["boxed_images"], everything["held_out_images"]) == (
        len(read_gt_boxes(mil_work / GT_BOXES_FILE)),
        0,
    )
    evaluate(workdir=str(mil_work), run="release")
    summary = run_harvest(str(mil_work), "release", dask_address=dask_cluster, method="mil")
    assert summary["key"]["checkpoints"] == [hashlib.sha256(folder.checkpoint("mil-all").read_bytes()).hexdigest()]
    root = json.loads((mil_work / "ingest_report.json").read_text())["root"]
    published = release(workdir=str(mil_work), out=str(tmp_path / "releases"), root=root)
    target = Path(published["path"])
    boxes = pq.read_table(target / "boxes.parquet")
    assert boxes.num_rows > 0 and set(boxes.column("method").to_pylist()) == {"mil"}
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["harvest_key"]["method"] == "mil"
    assert manifest["model"]["mil"]["checkpoint"] == "mil-all" and "all" in manifest["model"]["mil"]["note"]
    page = (target / "report" / "cardiomegaly.html").read_text()
    assert "MIL" in page and "mil-all" in (target / "report" / "index.html").read_text()
