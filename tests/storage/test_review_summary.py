"""The report's review table: verdict shares, ground truth by source, a finding's figures read
from a release manifest before and after."""

from __future__ import annotations

import pytest

from cxr_miner.storage.releases.review_summary import release_figures, review_rows, verdict_counts
from cxr_miner.storage.releases.reviews import REVIEWS_FILE, ReleasedBox, ReviewStore

MANIFEST = {
    "counts": {"findings": {"Edema": {"boxes": 30, "images": 10, "at_operating_point": 7}}},
    "localisation": {"ci": 0.95, "findings": {"Edema": {"pairs": 12, "acc": 0.75, "acc_ci": [0.5, 1.0]}}},
    "operating_points": {
        "Edema": {"box_test": {"pairs": 12, "precision": 0.6, "precision_interval": [0.4, 0.8], "ece": 0.1}}
    },
}


def test_a_findings_figures_come_from_the_manifests_counts_localisation_and_operating_points():
    edema = release_figures(MANIFEST)["Edema"]
    assert edema == {
        "coco_boxes": 7, "pairs": 12, "acc": 0.75, "acc_ci": [0.5, 1.0],
        "precision": 0.6, "precision_ci": [0.4, 0.8], "ece": 0.1, "ece_ci": None,
    }  # fmt: skip
    assert release_figures(MANIFEST)["Hernia"]["coco_boxes"] == 0 and release_figures(None) == {}
    older = {**MANIFEST, "localisation": {"findings": MANIFEST["localisation"]["findings"]}}  # made with 90% intervals
    assert release_figures(older)["Edema"]["precision_ci"] is None


def test_review_rows_give_verdict_shares_sources_and_before_and_after():
    verdicts = {"Edema": {"accept": 3, "reject": 1, "redraw": 0, "skip": 0}}
    rows = {r["finding"]: r for r in review_rows(verdicts, {"Edema": {"review": 3}}, {}, release_figures(MANIFEST))}
    edema = rows["Edema"]
    assert edema["reviewed"] == 4 and edema["shares"] == pytest.approx(
        {"accept": 0.75, "reject": 0.25, "redraw": 0, "skip": 0}
    )
    assert edema["ground_truth"] == {"nih": 0, "review": 3} and edema["before"] is None  # a first release
    assert edema["after"]["coco_boxes"] == 7 and rows["Mass"]["reviewed"] == 0 and rows["Mass"]["shares"] == {}


def test_verdict_counts_leave_out_undone_verdicts(tmp_path):
    boxes = {f"b{k}": ReleasedBox(f"b{k}", f"img{k}", "Edema", 100, 100, (0.0, 0.0, 10.0, 10.0)) for k in range(3)}
    assert verdict_counts(tmp_path) == {}  # no store yet
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        store.record("v1", boxes, "b0", "accept", "ann")
        store.record("v1", boxes, "b1", "reject", "ann")
        store.record("v1", boxes, "b2", "reject", "bob")
        store.undo("v1", "bob")
    assert verdict_counts(tmp_path)["Edema"] == {"accept": 1, "reject": 1, "redraw": 0, "skip": 0}
