"""Training, attention mining and evaluation end to end on phantoms, with the cpu-small preset.

The phantoms have findings drawn at known places, so the classifier must rank planted
findings above chance and attention mining must localise at least as well as the CAM
baseline at T(IoU) = 0.1, the comparison of Cai et al. Table 2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_miner.flows.engine.checkpoints import load_model, load_models, read_config
from cxr_miner.flows.engine.loader import shard_loader
from cxr_miner.flows.evaluate import evaluate
from cxr_miner.flows.train import train
from cxr_miner.miner.attention import mine
from cxr_miner.miner.methods import create_method
from cxr_miner.miner.metrics import roc_auc
from cxr_miner.miner.training import predict, prepare_images, preset
from cxr_miner.storage.stages.batches import batch_stream, split_row_groups
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FINDINGS
from tests.flows.helpers import SETTINGS, copy_workdir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(trained_workdir, tmp_path_factory) -> Path:
    """The shared trained run, copied: these tests evaluate and train in it (a flow holds its folder's lock)."""
    return copy_workdir(trained_workdir, tmp_path_factory.mktemp("train") / "work")


def test_run_folder_holds_every_step_and_its_metrics(trained):
    folder = RunFolder.of(trained, "t")
    metrics = json.loads(folder.metrics_file.read_text())
    assert [len(metrics[f"step{t}"]) for t in (1, 2, 3)] == [SETTINGS["epochs"], 1, 1]
    model, record = load_model(folder.step(3))
    assert record["step"] == 3 and record["config"]["kp"] == "kp"
    assert all(math.isfinite(row["loss_kp"]) for row in metrics["step2"] + metrics["step3"])
    step1 = load_model(folder.step(1))[1]["metrics"]["auc"]  # the kept step 1, its best epoch
    for name in ("step2", "step3"):  # each AM step against it, finding by finding
        last = metrics[name][-1]
        for finding, change in last["auc_against_step1"].items():
            if step1[finding] is not None and last["auc"][finding] is not None:
                assert change["change"] == pytest.approx(last["auc"][finding] - step1[finding])
        assert sorted(last["forgotten"]) == sorted(
            f for f, c in last["auc_against_step1"].items() if c["change"] is not None and c["change"] < -0.02
        )
    # each change's interval: the kept step 1 and the step's model, predicted again on the val split
    from cxr_miner.miner.forgetting import change_intervals

    loader = shard_loader(split_row_groups(trained, ("val",)), 32, shuffle=False, workers=0)
    first, labels = predict(load_model(folder.step(1))[0], loader, preset("cpu-small"), torch.device("cpu"))
    for name in ("step2", "step3"):
        now, _ = predict(load_model(folder.checkpoint(name))[0], loader, preset("cpu-small"), torch.device("cpu"))
        expected = change_intervals(first.numpy(), now.numpy(), labels.numpy(), FINDINGS)
        recorded = metrics[name][-1]["auc_change_interval"]
        assert recorded == {f: [None if math.isnan(b) else b for b in bounds] for f, bounds in expected.items()}
        defined = {f: b for f, b in recorded.items() if b[0] is not None}
        assert defined and all(low <= high for low, high in defined.values())
        assert all(metrics[name][-1]["auc_against_step1"][f]["interval"] == b for f, b in defined.items())


def test_planted_findings_are_ranked_above_chance(trained):
    config = preset("cpu-small")
    model, _ = load_model(RunFolder.of(trained, "t").step(1))
    loader = shard_loader(split_row_groups(trained, ("test",)), 32, shuffle=False, workers=0)
    scores, labels = predict(model, loader, config, torch.device("cpu"))
    aucs = {f: roc_auc(scores[:, c].numpy(), labels[:, c].numpy()) for c, f in enumerate(FINDINGS)}
    finite = [v for v in aucs.values() if not math.isnan(v)]
    assert np.mean(finite) > 0.6, aucs
    assert aucs["Cardiomegaly"] > 0.8, aucs  # the largest planted pattern


@pytest.fixture(scope="module")
def evaluated(trained) -> dict:
    return evaluate(workdir=str(trained), run="t")


def test_attention_mining_localises_at_least_as_well_as_cam(trained, evaluated):
    report = evaluated
    assert report["steps"] == [1, 2, 3] and report["split"] == "box-test"
    evaluated = [f for f in BOXED_FINDINGS if report["evaluated"][f] > 0]
    assert len(evaluated) >= 4

    def mean_acc(method):
        return np.mean([report["results"][method][f]["iou"][0.1]["acc"] for f in evaluated])

    assert mean_acc("am-t3") >= mean_acc("cam"), report["markdown"]
    markdown = RunFolder.of(trained, "t").evaluation_md.read_text()
    rows_at_01 = re.findall(r"^\| 0\.1 \| ([^|]+?) \|", markdown, flags=re.MULTILINE)
    # a row per method at T = 0.1 in each of the IoU and IoR tables (a cell elsewhere may read 0.1 too)
    assert sorted(rows_at_01) == sorted(2 * list(report["results"]))
    assert {"cam", "am-t2", "am-t3", "released"} <= set(report["results"])
    metrics = RunFolder.of(trained, "t").metrics()  # the intervals training recorded reach evaluate's forgetting report
    for name in ("step2", "step3"):
        changes = report["forgetting"]["steps"][name]["changes"]
        assert {f: c.get("interval") for f, c in changes.items()} == metrics[name][-1]["auc_change_interval"]


def test_max_box_acc_and_box_rules_of_evaluate_match_a_direct_computation(trained, evaluated):
    """CAM heatmaps of the box-test images, straight from the method, scored with MaxBoxAccumulator
    and boxed by the every-component rule ranked by mass: the same figures as the evaluate flow's
    (which takes its maps from the boxing pass)."""
    from cxr_miner.miner.localize import boxes_in_source, upsample
    from cxr_miner.miner.metrics import LocalizationEvaluator, MaxBoxAccumulator
    from cxr_miner.miner.rules import RULES_BY_NAME
    from cxr_miner.storage.stages.box_splits import box_splits
    from cxr_miner.storage.stages.index import GT_BOXES_FILE, read_gt_boxes, read_index

    folder = RunFolder.of(trained, "t")
    config = read_config(folder)
    method = create_method("cam", config)
    models = load_models(folder, method.checkpoints(), torch.device("cpu"))
    truth = read_gt_boxes(trained / GT_BOXES_FILE)
    patients = {
        r["image_id"]: r["patient_id"]
        for r in read_index(trained / "index.parquet").select(["image_id", "patient_id"]).to_pylist()
    }
    halves = box_splits(patients, truth)
    ours, rule = MaxBoxAccumulator(), LocalizationEvaluator()
    size = config.input_size
    for batch in batch_stream(split_row_groups(trained, ("train", "val", "test"), only_boxed=True), 16):
        with torch.no_grad():
            maps, _ = method.heatmaps(
                models, prepare_images(torch.from_numpy(batch.images), size, torch.device("cpu")), None
            )
        for i, (image_id, letterbox) in enumerate(zip(batch.meta["image_id"], batch.letterboxes())):
            if halves[image_id] != "box-test":
                continue
            for finding, gt in truth[image_id].items():
                heatmap = upsample(maps[i, FINDINGS.index(finding)], size).numpy()
                ours.accumulate(finding, heatmap, gt, lambda b, lb=letterbox: boxes_in_source(b, size, lb))
                rule.accumulate(
                    finding, boxes_in_source(RULES_BY_NAME["every-mass"].boxes(heatmap).boxes, size, letterbox), gt
                )
    theirs = evaluated["max_box_acc_v2"]["cam"]
    for finding, figures in ours.compute().items():
        assert figures["pairs"] == theirs[finding]["pairs"] == (evaluated["evaluated"].get(finding, 0))
        if figures["pairs"]:
            assert figures["max_box_acc_v2"] == pytest.approx(theirs[finding]["max_box_acc_v2"]), finding
    assert sum(f["pairs"] for f in ours.compute().values()) > 0
    theirs_rule, ours_rule = evaluated["box_rules"]["cam"]["every-mass"], rule.compute()
    for finding in BOXED_FINDINGS:
        for threshold in (0.1, 0.3, 0.5):
            mine, recorded = ours_rule[finding]["iou"][threshold], theirs_rule[finding]["iou"][threshold]
            for figure in ("acc", "afp", "acc_ci"):  # the CI too: the same images, the same seeded resamples
                assert mine[figure] == pytest.approx(recorded[figure], nan_ok=True), (finding, threshold, figure)
    assert (
        "## Box rules: mean Acc at T(IoU) = 0.3" in evaluated["markdown"]
        and "| cam | every-mass |" in evaluated["markdown"]
    )


def test_attention_mining_changes_the_heatmaps_where_later_steps_erase(trained):
    """Eq. 8 adds what steps 2..T mine: wherever step 2 erased a region of a labelled finding's
    map, the AM heatmap differs from the CAM baseline's. An AM that changed nothing fails here."""
    folder = RunFolder.of(trained, "t")
    config = read_config(folder)
    cam, am = create_method("cam", config), create_method("am", config)
    models = load_models(folder, am.checkpoints())
    batch = next(batch_stream(split_row_groups(trained, ("train",)), 32))
    labels = torch.from_numpy(batch.labels)
    x = prepare_images(torch.from_numpy(batch.images), config.input_size, torch.device("cpu"))
    with torch.no_grad():
        cam_maps, _ = cam.heatmaps(models, x, lambda logits: labels)
        am_maps, _ = am.heatmaps(models, x, lambda logits: labels)
        masks = mine(models, x, lambda logits: labels).masks
    mined_by_step_2 = ((masks[0] - masks[1]) > 0).flatten(2).any(dim=2) & labels  # (N, C)
    assert int(mined_by_step_2.sum()) >= 5
    difference = (am_maps - cam_maps).abs().flatten(2).amax(dim=2)  # (N, C)
    assert bool((difference[mined_by_step_2] > 1e-3).all()), difference[mined_by_step_2]


def test_rerun_skips_finished_steps_and_other_settings_are_refused(trained, tmp_path):
    directory = RunFolder.of(trained, "t").directory
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.safetensors")}
    config = trained / "settings.json"
    summary = train(workdir=str(trained), preset="cpu-small", config_file=str(config), run="t")
    assert summary["steps"] == [1, 2, 3]
    only_cam = train(workdir=str(trained), preset="cpu-small", config_file=str(config), run="t", method="cam")
    assert only_cam["steps"] == [1]  # --method cam trains (here: finds trained) step 1 alone
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("*.safetensors")} == before
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SETTINGS, "epochs": 3}))
    with pytest.raises(ValueError, match="run 't' was started with other settings"):
        train(workdir=str(trained), preset="cpu-small", config_file=str(other), run="t")


def test_nothing_is_chosen_on_box_test(trained, evaluated, tmp_path):
    """Move every box-test ground-truth box to a corner: the choices of tuning.json (variant, box
    rule, box size, calibration, operating point) stay exactly the same, and only box-test's figures change."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cxr_miner.storage.stages.box_splits import BOX_TEST, box_splits
    from cxr_miner.storage.stages.index import GT_BOXES_FILE, read_gt_boxes, read_index
    from tests.flows.helpers import copy_workdir

    work = copy_workdir(trained, tmp_path / "work")
    truth = read_gt_boxes(work / GT_BOXES_FILE)
    patients = {
        r["image_id"]: r["patient_id"]
        for r in read_index(work / "index.parquet").select(["image_id", "patient_id"]).to_pylist()
    }
    test_images = [i for i, half in box_splits(patients, truth).items() if half == BOX_TEST]
    table = pq.read_table(work / GT_BOXES_FILE)
    moved = pc.is_in(table.column("image_id"), pa.array(test_images))
    for name, value in (("x_min", 0.0), ("y_min", 0.0), ("x_max", 2.0), ("y_max", 2.0)):
        column = table.column(name)
        table = table.set_column(
            table.schema.get_field_index(name), name, pc.if_else(moved, pa.scalar(value, column.type), column)
        )
    (work / GT_BOXES_FILE).unlink()  # a hard link to the shared run's file
    pq.write_table(table, work / GT_BOXES_FILE)

    again = evaluate(workdir=str(work), run="t")
    before = json.loads(RunFolder.of(trained, "t").tuning_json.read_text())
    after = json.loads(RunFolder.of(work, "t").tuning_json.read_text())
    assert before["findings"].keys() == after["findings"].keys() == set(BOXED_FINDINGS)
    for finding, choice in before["findings"].items():
        assert after["findings"][finding]["method"] == choice["method"]
        for variant, entry in choice["candidates"].items():
            moved_entry = after["findings"][finding]["candidates"][variant]
            for key in ("rule", "box_size", "calibration", "operating_point", "fitted_on", "box_val"):
                assert json.dumps(moved_entry[key], sort_keys=True) == json.dumps(entry[key], sort_keys=True), (
                    finding,
                    variant,
                    key,
                )
        assert after["findings"][finding]["choice"] == choice["choice"]  # the stability over box-val's resamples too
    assert again["released"]["mean_acc"] == 0 < evaluated["released"]["mean_acc"]
