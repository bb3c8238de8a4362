"""COCO detection figures of the detector check, by pycocotools' COCOeval, per finding and overall.

One COCOeval at IoU thresholds (0.3, 0.5, 0.55, ..., 0.95) and 1, 3 and 100 detections per image,
area "all", on ground truth and detections given as in-memory lists (source pixels, xywh):

- ``ap30``, ``ap50``: AP at IoU 0.3 (the papers' T(IoU) for localisation) and 0.5 (PASCAL VOC);
- ``ap``: AP averaged over IoU 0.5:0.95 (COCO's headline AP); all three with up to 100 detections;
- ``recall1_30``, ``recall3_30`` (and ``*_50``): recall with the 1 or 3 top-scored detections of
  the finding per image, at IoU 0.3 (0.5).

Per finding: that category alone; overall: the mean over the findings with ground truth (COCO's
averaging). A finding without ground truth has no figures (NaN); without any detection, zero.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cxr_miner.storage.vocab.findings import FINDINGS

IOU_THRESHOLDS = np.array([0.3, *np.linspace(0.5, 0.95, 10)])
MAX_DETECTIONS = [1, 3, 100]
METRICS = ("ap30", "ap50", "ap", "recall1_30", "recall3_30", "recall1_50", "recall3_50")


def coco_ground_truth(
    truth: Mapping[str, Sequence[tuple[str, Sequence[float]]]], sizes: Mapping[str, tuple[int, int]]
) -> tuple[dict[str, Any], dict[str, int]]:
    """image id -> [(finding, xyxy)] and image id -> (width, height) -> (a COCO dataset dict, image id -> COCO id).
    Every image of ``truth`` is listed, boxed or not; category ids are FINDINGS positions + 1."""
    ids = {image: k for k, image in enumerate(sorted(truth), start=1)}
    annotations: list[dict[str, Any]] = []
    for image, boxes in sorted(truth.items()):
        for finding, (x0, y0, x1, y1) in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": ids[image],
                    "category_id": FINDINGS.index(finding) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    images = [{"id": ids[i], "width": sizes[i][0], "height": sizes[i][1], "file_name": i} for i in sorted(truth)]
    categories = [{"id": k + 1, "name": f} for k, f in enumerate(FINDINGS)]
    return {"images": images, "annotations": annotations, "categories": categories}, ids


def coco_results(found: Sequence[Mapping[str, Any]], ids: Mapping[str, int]) -> list[dict[str, Any]]:
    """Detections {"image", "finding", "bbox" xywh, "score"} -> COCO results of the images in ``ids``."""
    return [
        {
            "image_id": ids[d["image"]],
            "category_id": FINDINGS.index(d["finding"]) + 1,
            "bbox": list(d["bbox"]),
            "score": float(d["score"]),
        }
        for d in found
        if d["image"] in ids
    ]


def detection_figures(
    truth: Mapping[str, Sequence[tuple[str, Sequence[float]]]],
    sizes: Mapping[str, tuple[int, int]],
    found: Sequence[Mapping[str, Any]],
    findings: Sequence[str],
) -> dict[str, dict[str, float]]:
    """{finding: {metric: value}, "overall": {...}} for ``findings`` (module doc)."""
    dataset, ids = coco_ground_truth(truth, sizes)
    categories = [FINDINGS.index(f) + 1 for f in findings]
    has_truth = {a["category_id"] for a in dataset["annotations"]}
    results = coco_results(found, ids)
    if not results:
        zero = {m: 0.0 for m in METRICS}
        per = {
            f: dict(zero) if FINDINGS.index(f) + 1 in has_truth else dict.fromkeys(METRICS, math.nan) for f in findings
        }
        return {**per, "overall": _overall(per)}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.params.iouThrs = IOU_THRESHOLDS
        evaluation.params.maxDets = MAX_DETECTIONS
        evaluation.params.catIds = categories
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"]  # (T, R, K, A, M): -1 where a category has no ground truth
    recall = evaluation.eval["recall"]  # (T, K, A, M)
    position = {c: k for k, c in enumerate(evaluation.params.catIds)}  # COCOeval sorts the category ids
    per = {
        f: _figures(precision[:, :, position[c], 0, :], recall[:, position[c], 0, :])
        for f, c in zip(findings, categories)
    }
    return {**per, "overall": _overall(per)}


def undefined_figures(findings: Sequence[str]) -> dict[str, dict[str, float]]:
    """The figures of a detector that was not trained (no image to learn from): NaN throughout."""
    return {f: dict.fromkeys(METRICS, math.nan) for f in [*findings, "overall"]}


def _figures(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """One category's figures from its precision (T, R, M) and recall (T, M) arrays."""
    if (recall < 0).all():
        return dict.fromkeys(METRICS, math.nan)
    at = {0.3: 0, 0.5: 1}
    figures = {
        "ap30": float(precision[0, :, -1].mean()),
        "ap50": float(precision[1, :, -1].mean()),
        "ap": float(precision[1:, :, -1].mean()),
    }
    for threshold, t in at.items():
        for m, dets in ((0, 1), (1, 3)):
            figures[f"recall{dets}_{round(threshold * 100)}"] = float(recall[t, m])
    return figures


def _overall(per: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    scored = [v for v in per.values() if not math.isnan(v["ap30"])]
    return {m: float(np.mean([v[m] for v in scored])) if scored else math.nan for m in METRICS}
