"""COCOeval figures of the detector check on hand-made detections whose AP and recall are worked out by hand."""

from __future__ import annotations

import math

import pytest

from cxr_miner.miner.detection_metrics import detection_figures

SIZES = {"a": (100, 100), "b": (100, 100)}
TRUTH = {
    "a": [("Nodule", [0.0, 0.0, 10.0, 10.0])],
    "b": [("Nodule", [0.0, 0.0, 10.0, 10.0]), ("Mass", [50.0, 50.0, 90.0, 90.0])],
}


def det(image: str, box: list[float], score: float, finding: str = "Nodule") -> dict:
    x0, y0, x1, y1 = box
    return {"image": image, "finding": finding, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}


# a hit (IoU 1), a box of IoU 0.4 (a hit at 0.3, a miss at 0.5 and above), a false box, by falling score
FOUND = [det("a", [0, 0, 10, 10], 0.9), det("b", [0, 0, 10, 4], 0.8), det("a", [20, 20, 30, 30], 0.7)]


def test_ap_and_recall_at_each_iou_by_hand():
    figures = detection_figures(TRUTH, SIZES, FOUND, ["Nodule", "Mass", "Effusion"])
    nodule = figures["Nodule"]
    # IoU 0.3: hit, hit, miss -> precision 1 up to recall 1: AP 1
    assert nodule["ap30"] == pytest.approx(1.0)
    # IoU 0.5 and above: hit, miss, miss -> precision 1 up to recall 0.5, then none: 51 of COCO's 101 recall points
    assert nodule["ap50"] == pytest.approx(51 / 101)
    assert nodule["ap"] == pytest.approx(51 / 101)
    # the top detection per image: a's is the hit, b's the IoU-0.4 box
    assert (nodule["recall1_30"], nodule["recall3_30"]) == (1.0, 1.0)
    assert (nodule["recall1_50"], nodule["recall3_50"]) == (0.5, 0.5)
    # Mass has ground truth and no detection: zeros; Effusion has no ground truth: undefined
    assert figures["Mass"] == {k: 0.0 for k in nodule}
    assert all(math.isnan(v) for v in figures["Effusion"].values())
    # overall: COCO's mean over the findings with ground truth
    assert figures["overall"]["ap30"] == pytest.approx(0.5)
    assert figures["overall"]["recall1_50"] == pytest.approx(0.25)


def test_no_detection_at_all_scores_zero_where_there_is_truth():
    figures = detection_figures(TRUTH, SIZES, [], ["Nodule", "Effusion"])
    assert figures["Nodule"]["ap30"] == 0.0 and math.isnan(figures["Effusion"]["ap30"])
    assert figures["overall"]["ap30"] == 0.0


def test_the_order_of_scores_matters_and_other_images_are_ignored():
    # the false box first: precision 1/2 at recall 0.5, 2/3 at recall 1 -> interpolated 2/3 everywhere
    found = [det("a", [20, 20, 30, 30], 0.95), *FOUND[:2], det("elsewhere", [0, 0, 10, 10], 0.99)]
    assert detection_figures(TRUTH, SIZES, found, ["Nodule"])["Nodule"]["ap30"] == pytest.approx(2 / 3)
