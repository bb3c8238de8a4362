"""What each detector of the detector check learns from, and what they are all scored on.

Scored on: the ``box-test`` images (storage.stages.box_splits) with their ground-truth boxes of the
*checked findings*: those with ground-truth boxes on both halves (box-val to build the prior from,
box-test to score). No image of a box-test patient is trained on by any detector.

Training sets (TRAINING_SETS), each a map image id -> [(finding, xyxy source box), ...]:

- ``mined``: the release's train-split boxes at their finding's operating point (those of coco/);
- ``mined-all``: every mined train-split box (those of coco-all/);
- ``box-val-truth``: the radiologists' boxes of the box-val images (real boxes, fewer of them);
- ``prior``: for every train-split image and checked finding it is labelled with, the finding's mean
  box-val box (mean of the corners as fractions of the image), placed on the image: what a detector
  can learn from labels alone.

Only checked findings' boxes are used. An image labelled with a checked finding joins a set only if
the set boxes every checked finding it is labelled with (else the detector would learn its lesion as
background; the count left out is reported). Each set adds background images (train-split images
labelled with no checked finding), ``background_ratio`` per positive image, the same ones for every
set in a fixed order by hash, so that the sets differ in their boxes, not their negatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_miner.storage.releases.release import BOXES_FILE
from cxr_miner.storage.stages.atomic import read_json, write_json
from cxr_miner.storage.stages.box_splits import BOX_TEST, BOX_VAL, box_splits
from cxr_miner.storage.stages.index import unit_hash
from cxr_miner.storage.vocab.errors import SettingError
from cxr_miner.storage.vocab.findings import FINDINGS

Box = list[float]  # xyxy, source pixels
Boxes = dict[str, list[tuple[str, Box]]]  # image id -> [(finding, box), ...]
TRAINING_SETS = {
    "mined": "mined boxes at the operating point",
    "mined-all": "all mined boxes",
    "box-val-truth": "ground-truth boxes of box-val",
    "prior": "each finding's mean box-val box",
}
_BACKGROUND_SALT = "cxr-miner/detector-background/v1"


@dataclass(frozen=True)
class TrainingSet:
    """One detector's images and boxes (``boxes``: background images map to [])."""

    name: str
    boxes: Boxes
    positives: int
    background: int
    left_out: int  # labelled with a checked finding the set has no box for

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": TRAINING_SETS[self.name],
            "images": len(self.boxes),
            "positive_images": self.positives,
            "background_images": self.background,
            "boxes": sum(len(b) for b in self.boxes.values()),
            "left_out_images": self.left_out,
        }


@dataclass(frozen=True)
class CheckPlan:
    """The detector check's data: the checked findings, the training sets, and the box-test
    images with their ground truth (image id -> [(finding, box)], every box-test image listed)."""

    findings: tuple[str, ...]
    sets: dict[str, TrainingSet]
    test: Boxes
    box_val_fraction: float
    prior: dict[str, Box] = field(default_factory=dict)  # finding -> mean box-val box as fractions of the image


def checked_findings(truth: Mapping[str, Mapping[str, list[Box]]], halves: Mapping[str, str]) -> tuple[str, ...]:
    """Findings with ground-truth boxes on box-val images and on box-test images, FINDINGS order."""
    found = {
        half: {f for image, by in truth.items() if halves.get(image) == half for f in by}
        for half in (BOX_VAL, BOX_TEST)
    }
    return tuple(f for f in FINDINGS if f in found[BOX_VAL] and f in found[BOX_TEST])


def mean_boxes(
    truth: Mapping[str, Mapping[str, list[Box]]],
    images: list[str],
    sizes: Mapping[str, tuple[int, int]],
    findings: tuple[str, ...],
) -> dict[str, Box]:
    """finding -> the mean of its boxes on ``images`` as fractions of each image's (width, height)."""
    means = {}
    for finding in findings:
        rows = [
            np.array(box) / np.array([*sizes[i], *sizes[i]])
            for i in images
            for box in truth.get(i, {}).get(finding, [])
        ]
        if rows:
            means[finding] = [float(v) for v in np.mean(rows, axis=0)]
    return means


def plan_check(
    images: pa.Table,
    sizes: Mapping[str, tuple[int, int]],
    truth: Mapping[str, Mapping[str, list[Box]]],
    mined: pa.Table,
    box_val_fraction: float,
    background_ratio: float = 1.0,
) -> CheckPlan:
    """The check's sets (module doc). ``images``: the images the detectors may read (those in the
    shards), with the index's columns image_id, patient_id, split and the 14 findings; ``sizes``:
    image id -> (width, height) in source pixels; ``truth``: image id -> finding -> boxes;
    ``mined``: the release's boxes.parquet rows (image_id, split, finding, x_min..y_max, rank,
    at_operating_point)."""
    if background_ratio < 0:
        raise SettingError(f"background ratio must be >= 0, got {background_ratio}")
    rows = images.to_pydict()
    ids = rows["image_id"]
    patients = dict(zip(ids, rows["patient_id"]))
    boxed = [i for i in ids if i in truth]
    halves = box_splits(patients, boxed, box_val_fraction)
    findings = checked_findings(truth, halves)
    test_patients = {patients[i] or i for i, half in halves.items() if half == BOX_TEST}
    labels = {i: {f for f in findings if rows[f][k]} for k, i in enumerate(ids)}
    train = [i for i, split in zip(ids, rows["split"]) if split == "train" and (patients[i] or i) not in test_patients]
    background = sorted((i for i in train if not labels[i]), key=lambda i: unit_hash(i, salt=_BACKGROUND_SALT))
    box_val = [i for i in boxed if halves[i] == BOX_VAL]
    prior = mean_boxes(truth, box_val, sizes, findings)

    candidates = {
        "mined": _mined(mined, findings, at_operating_point=True),
        "mined-all": _mined(mined, findings, at_operating_point=False),
        "box-val-truth": {i: [(f, b) for f in findings for b in truth[i].get(f, [])] for i in box_val},
        "prior": {
            i: [(f, _place(prior[f], sizes[i])) for f in sorted(labels[i], key=FINDINGS.index)]
            for i in train
            if labels[i]
        },
    }
    pools = {"mined": train, "mined-all": train, "box-val-truth": box_val, "prior": train}
    sets = {
        name: _training_set(
            name, {i: candidates[name].get(i, []) for i in pools[name]}, labels, background, background_ratio
        )
        for name in TRAINING_SETS
    }
    test = {i: [(f, b) for f in findings for b in truth[i].get(f, [])] for i in boxed if halves[i] == BOX_TEST}
    return CheckPlan(findings, sets, test, box_val_fraction, prior)


def _mined(table: pa.Table, findings: tuple[str, ...], at_operating_point: bool) -> Boxes:
    keep = pc.and_(
        pc.equal(table.column("split"), "train"), pc.is_in(table.column("finding"), pa.array(findings, pa.string()))
    )
    if at_operating_point:
        keep = pc.and_(keep, pc.fill_null(table.column("at_operating_point"), False))
    boxes: Boxes = {}
    for row in (
        table.filter(keep)
        .sort_by([("image_id", "ascending"), ("finding", "ascending"), ("rank", "ascending")])
        .to_pylist()
    ):
        boxes.setdefault(row["image_id"], []).append(
            (row["finding"], [row[k] for k in ("x_min", "y_min", "x_max", "y_max")])
        )
    return boxes


def _place(fractions: Box, size: tuple[int, int]) -> Box:
    width, height = size
    return [fractions[0] * width, fractions[1] * height, fractions[2] * width, fractions[3] * height]


def _training_set(
    name: str, candidates: Boxes, labels: Mapping[str, set[str]], background: list[str], ratio: float
) -> TrainingSet:
    """The pool's labelled images whose every checked finding has a box, plus background images."""
    positives = {i: boxes for i, boxes in candidates.items() if labels[i] and labels[i] <= {f for f, _ in boxes}}
    left_out = sum(1 for i in candidates if labels[i] and i not in positives)
    negatives = background[: round(ratio * len(positives))]
    return TrainingSet(name, {**positives, **{i: [] for i in negatives}}, len(positives), len(negatives), left_out)


# One folder per training set under the check's folder: its boxes, then its detector's detections.
TRAINING_SET_FILE = "training-set.json"
DETECTIONS_FILE = "detections.json"
MINED_COLUMNS = ["image_id", "split", "finding", "x_min", "y_min", "x_max", "y_max", "rank", "at_operating_point"]


def read_mined_boxes(release: Path) -> pa.Table:
    """The release's boxes, the columns plan_check reads (MINED_COLUMNS)."""
    return pq.read_table(release / BOXES_FILE, columns=MINED_COLUMNS)


def write_training_set(folder: Path, boxes: Mapping[str, list[Any]]) -> None:
    write_json(folder / TRAINING_SET_FILE, boxes)


def read_training_set(folder: Path) -> dict[str, list[tuple[Any, ...]]]:
    """image id -> its (finding, x0, y0, x1, y1) boxes, as write_training_set wrote them."""
    stored = read_json(folder / TRAINING_SET_FILE, "run `cxr-miner detector-check` again to rewrite it")
    return {image: [tuple(entry) for entry in entries] for image, entries in stored.items()}


def write_detections(folder: Path, detections: Any) -> None:
    write_json(folder / DETECTIONS_FILE, detections)


def read_detections(folder: Path) -> Any:
    return read_json(folder / DETECTIONS_FILE, "run `cxr-miner detector-check` again to detect again")
