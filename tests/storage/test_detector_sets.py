"""The detector check's training sets and test set on a hand-made collection whose answer is worked out by hand."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cxr_miner.storage.releases.detector_sets import plan_check
from cxr_miner.storage.stages.box_splits import BOX_TEST, BOX_VAL, box_split
from cxr_miner.storage.stages.index import unit_hash
from cxr_miner.storage.vocab.findings import FINDINGS


def patient_in(half: str, taken: set[str]) -> str:
    patient = next(f"p{k}" for k in range(1000) if box_split(f"p{k}") == half and f"p{k}" not in taken)
    taken.add(patient)
    return patient


BACKGROUND = sorted(["a3", "a4"], key=lambda i: unit_hash(i, salt="cxr-miner/detector-background/v1"))


@pytest.fixture(scope="module")
def plan():
    return make_plan(background_ratio=1.0)


def make_plan(background_ratio: float):
    taken: set[str] = set()
    val1, val2, test = patient_in(BOX_VAL, taken), patient_in(BOX_VAL, taken), patient_in(BOX_TEST, taken)
    # image: (patient, split, labels, (width, height))
    images = {
        "v1": (val1, "val", {"Nodule", "Mass"}, (100, 100)),
        "v2": (val2, "train", {"Nodule"}, (200, 100)),
        "t1": (test, "train", {"Nodule", "Mass"}, (100, 100)),
        "t2": (test, "train", {"Nodule"}, (100, 100)),  # a box-test patient's image without boxes
        "a1": ("A", "train", {"Nodule"}, (200, 100)),
        "a2": ("B", "train", {"Nodule"}, (100, 100)),
        "a3": ("C", "train", {"Effusion"}, (100, 100)),
        "a4": ("D", "train", set(), (100, 100)),
        "a5": ("E", "val", set(), (100, 100)),
    }
    table = pa.table(
        {
            "image_id": list(images),
            "patient_id": [v[0] for v in images.values()],
            "split": [v[1] for v in images.values()],
            **{f: [f in v[2] for v in images.values()] for f in FINDINGS},
        }
    )
    truth = {
        "v1": {"Nodule": [[10.0, 10.0, 30.0, 30.0]]},
        "v2": {"Nodule": [[20.0, 20.0, 60.0, 40.0]]},
        "t1": {"Nodule": [[0.0, 0.0, 50.0, 50.0]], "Mass": [[50.0, 50.0, 90.0, 90.0]]},
    }
    mined = pa.Table.from_pylist(
        [
            {
                "image_id": "a1",
                "split": "train",
                "finding": "Nodule",
                "x_min": 1.0,
                "y_min": 2.0,
                "x_max": 3.0,
                "y_max": 4.0,
                "rank": 1,
                "at_operating_point": True,
            },
            {
                "image_id": "a2",
                "split": "train",
                "finding": "Nodule",
                "x_min": 5.0,
                "y_min": 6.0,
                "x_max": 7.0,
                "y_max": 8.0,
                "rank": 1,
                "at_operating_point": False,
            },
            {
                "image_id": "t1",
                "split": "train",
                "finding": "Nodule",
                "x_min": 0.0,
                "y_min": 0.0,
                "x_max": 9.0,
                "y_max": 9.0,
                "rank": 1,
                "at_operating_point": True,
            },
            {
                "image_id": "a3",
                "split": "train",
                "finding": "Effusion",
                "x_min": 0.0,
                "y_min": 0.0,
                "x_max": 9.0,
                "y_max": 9.0,
                "rank": 1,
                "at_operating_point": True,
            },
            {
                "image_id": "v1",
                "split": "val",
                "finding": "Nodule",
                "x_min": 0.0,
                "y_min": 0.0,
                "x_max": 9.0,
                "y_max": 9.0,
                "rank": 1,
                "at_operating_point": True,
            },
        ]
    )
    return plan_check(table, {i: v[3] for i, v in images.items()}, truth, mined, 0.5, background_ratio)


def test_checked_findings_have_truth_on_both_halves_and_only_box_test_is_scored(plan):
    assert plan.findings == ("Nodule",)  # Mass has boxes on box-test only
    assert plan.test == {"t1": [("Nodule", [0.0, 0.0, 50.0, 50.0])]}


def test_no_image_of_a_box_test_patient_is_trained_on(plan):
    for training_set in plan.sets.values():
        assert not {"t1", "t2"} & set(training_set.boxes)


def test_mined_sets_take_the_train_split_boxes_at_the_operating_point_or_all(plan):
    mined, mined_all = plan.sets["mined"], plan.sets["mined-all"]
    assert mined.boxes == {"a1": [("Nodule", [1.0, 2.0, 3.0, 4.0])], BACKGROUND[0]: []}
    # left out: a2 (its box is below the operating point) and v2 (a train-split image with no mined box)
    assert (mined.positives, mined.background, mined.left_out) == (1, 1, 2)
    assert mined_all.boxes == {
        "a1": [("Nodule", [1.0, 2.0, 3.0, 4.0])],
        "a2": [("Nodule", [5.0, 6.0, 7.0, 8.0])],
        "a3": [],
        "a4": [],
    }


def test_box_val_truth_is_the_radiologists_boxes_of_box_val(plan):
    assert plan.sets["box-val-truth"].boxes == {
        "v1": [("Nodule", [10.0, 10.0, 30.0, 30.0])],
        "v2": [("Nodule", [20.0, 20.0, 60.0, 40.0])],
        "a3": [],
        "a4": [],
    }


def test_the_prior_is_the_mean_box_val_box_placed_on_each_labelled_image(plan):
    # v1 [10, 10, 30, 30] of 100 x 100 and v2 [20, 20, 60, 40] of 200 x 100: fractions [.1, .1, .3, .3] and [.1, .2, .3, .4]
    assert plan.prior["Nodule"] == pytest.approx([0.1, 0.15, 0.3, 0.35])
    prior = plan.sets["prior"].boxes
    assert prior["a1"][0][0] == "Nodule" and prior["a1"][0][1] == pytest.approx(
        [20.0, 15.0, 60.0, 35.0]
    )  # a1 is 200 x 100
    assert prior["a2"][0][1] == pytest.approx([10.0, 15.0, 30.0, 35.0])
    assert set(prior) == {"a1", "a2", "v2", "a3", "a4"}  # v2 is a train-split image labelled Nodule


def test_background_images_follow_the_ratio_in_the_same_order_for_every_set():
    assert all(s.background == 0 for s in make_plan(0.0).sets.values())
    half = make_plan(0.5).sets
    assert half["mined-all"].background == 1 and BACKGROUND[0] in half["mined-all"].boxes  # 2 positives x 0.5
    with pytest.raises(ValueError, match="background ratio"):
        make_plan(-1.0)


def test_the_mined_boxes_beat_the_prior_only_by_more_than_the_margin():
    from cxr_miner.storage.releases.detector_check import verdicts

    def figures(mined: float, prior: float) -> dict:
        return {
            "mined": {"Nodule": {"ap30": mined}, "overall": {"ap30": mined}},
            "prior": {"Nodule": {"ap30": prior}, "overall": {"ap30": prior}},
        }

    assert verdicts(figures(0.30, 0.10), ["Nodule"])["Nodule"] == "beats the prior (AP@0.3 0.30 against 0.10)"
    assert verdicts(figures(0.004, 0.0), ["Nodule"])["Nodule"].startswith("does not beat the prior")
    assert verdicts(figures(float("nan"), 0.2), ["Nodule"])["overall"].startswith("not scored")
