"""The detector check end to end on the shared release: four detectors trained the same way, their
COCOeval figures re-scored here from the detections they wrote, and the checked copy published as a
new release that differs from the checked one only by the added file and page.

Whether the detectors learn (one trained on the truth against one on the prior) is a learning run:
bench/detector_check.py on the demo, figures in BENCHMARKS.md ("Detector check")."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cxr_miner.flows.detector_check import make_plan, run_detector_check
from cxr_miner.storage.releases.release import MANIFEST_FILE
from cxr_miner.storage.stages.provenance import file_sha256
from cxr_miner.storage.vocab.findings import FINDINGS
from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
# A small detector at the shards' 128 px: a narrow box head, few RoIs, positives only (no background images),
# 2 epochs: what is checked is what the flow writes and publishes, not how well the detectors learn.
TINY = {
    "size": 128,
    "epochs": 2,
    "background_ratio": 0.0,
    "settings": {"lr": 0.01, "batch_size": 4, "rois_per_image": 16, "box_head": 256},
}


@pytest.fixture(scope="module")
def checked(released, dask_cluster, tmp_path_factory):
    """The first shared release copied into a releases folder of its own, and its detector check."""
    work, releases, first, _ = released
    base = tmp_path_factory.mktemp("detector-check")
    own_work = copy_workdir(work, base / "work")
    source = base / "releases" / first["version"]
    shutil.copytree(first["path"], source)
    result = run_detector_check(str(source), str(own_work), dask_address=dask_cluster, **TINY)
    return own_work, source, result


def coco_eval(truth: dict, sizes: dict, found: list[dict], iou: list[float], categories: list[int]) -> list[float]:
    """COCOeval's own summary (stats) for these detections, built independently of miner.detection_metrics."""
    ids = {image: k + 1 for k, image in enumerate(sorted(truth))}
    gt = COCO()
    gt.dataset = {
        "images": [{"id": ids[i], "width": sizes[i][0], "height": sizes[i][1]} for i in ids],
        "categories": [{"id": k + 1, "name": f} for k, f in enumerate(FINDINGS)],
        "annotations": [
            {
                "id": n + 1,
                "image_id": ids[i],
                "category_id": FINDINGS.index(f) + 1,
                "iscrowd": 0,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "area": (b[2] - b[0]) * (b[3] - b[1]),
            }
            for n, (i, f, b) in enumerate((i, f, b) for i in sorted(truth) for f, b in truth[i])
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = [
            {
                "image_id": ids[d["image"]],
                "category_id": FINDINGS.index(d["finding"]) + 1,
                "bbox": d["bbox"],
                "score": d["score"],
            }
            for d in found
            if d["image"] in ids
        ]
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.params.iouThrs = np.array(iou)
        evaluation.params.catIds = categories
        evaluation.params.maxDets = [1, 3, 100]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def test_the_figures_are_cocoeval_of_the_detections_written(checked):
    work, source, result = checked
    check = result["check"]
    plan, sizes = make_plan(work, source, check["box_val_fraction"], 0.0)
    assert check["findings"] == list(plan.findings) and check["test_images"] == len(plan.test) > 0
    scored = [name for name in check["sets"] if name in result["detections"]]
    assert {"box-val-truth", "prior", "mined-all"} <= set(scored)
    for name in scored:
        found = json.loads(Path(result["detections"][name]).read_text())
        assert found and {d["image"] for d in found} <= set(plan.test)
        for finding in plan.findings:
            category = [FINDINGS.index(finding) + 1]
            at30 = coco_eval(plan.test, sizes, found, [0.3], category)
            standard = coco_eval(plan.test, sizes, found, [0.5 + 0.05 * k for k in range(10)], category)
            figures = check["figures"][name][finding]
            assert figures["ap30"] == pytest.approx(at30[0], abs=1e-9)
            assert figures["recall1_30"] == pytest.approx(at30[6], abs=1e-9)  # AR at maxDets[0] = 1
            assert figures["recall3_30"] == pytest.approx(at30[7], abs=1e-9)
            assert figures["ap"] == pytest.approx(standard[0], abs=1e-9)
            assert figures["ap50"] == pytest.approx(standard[1], abs=1e-9)


def test_the_checked_copy_is_a_new_release_with_only_the_check_added(checked):
    _, source, result = checked
    target = Path(result["path"])
    assert target.parent == source.parent and target.name > source.name
    assert (source.parent / "latest").resolve() == target
    before = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    after = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert after - before == {"detector-check.json", "report/detector-check.html", "report/detector-check-ap30.png"}
    for name in before - {MANIFEST_FILE}:
        assert file_sha256(target / name) == file_sha256(source / name)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    old = json.loads((source / MANIFEST_FILE).read_text())
    assert manifest["version"] == target.name and manifest["detector_check"]["checked_release"] == source.name
    assert manifest["detector_check"]["sha256"] == file_sha256(target / "detector-check.json")
    assert manifest["files"] == {name: file_sha256(target / name) for name in after - {MANIFEST_FILE}}
    assert {k: v for k, v in manifest.items() if k not in ("version", "files", "detector_check")} == {
        k: v for k, v in old.items() if k not in ("version", "files")
    }
    page = (target / "report" / "detector-check.html").read_text()
    assert "detector-check-ap30.png" in page and all(
        f in page for f in json.loads((target / "detector-check.json").read_text())["findings"]
    )
