"""The report's review table (issue 25): per finding, what the reviewers said about its boxes,
where its ground truth now comes from, and its figures in the previous release and in this one.

A release's figures of a finding (``release_figures``) are read from its manifest: the boxes in
coco/ (those at the operating point), and on box-test the pairs, Acc at IoU 0.3, and the
precision and ECE at the operating point, each figure with its 95% CI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxr_miner.storage.releases.reviews import REVIEWS_FILE, VERDICTS, ReviewStore
from cxr_miner.storage.vocab.findings import FINDINGS

NO_FIGURES: dict[str, Any] = {"coco_boxes": 0, "pairs": 0}


def verdict_counts(workdir: Path) -> dict[str, dict[str, int]]:
    """finding -> verdict -> boxes with that verdict now (undone ones left out), over every
    release reviewed in ``workdir``; empty without a review store."""
    path = Path(workdir) / REVIEWS_FILE
    if not path.exists():
        return {}
    with ReviewStore(path) as store:
        return store.progress(None)


def release_figures(manifest: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """finding -> its figures in a release (module doc), from the release's ``manifest`` (its
    counts, localisation and operating points); {} for no release."""
    if not manifest:
        return {}
    counts = manifest.get("counts", {}).get("findings", {})
    found = manifest.get("localisation", {}).get("findings", {})
    points = manifest.get("operating_points", {})
    # a release made before the 95% CIs (no ``ci`` in its localisation) kept a 90% precision interval
    current = "ci" in manifest.get("localisation", {})
    figures = {}
    for finding in FINDINGS:
        test = points.get(finding, {}).get("box_test", {})
        acc = found.get(finding, {})
        figures[finding] = {
            "coco_boxes": counts.get(finding, {}).get("at_operating_point", 0),
            "pairs": acc.get("pairs", test.get("pairs", 0)),
            "acc": acc.get("acc"),
            "acc_ci": acc.get("acc_ci"),
            "precision": test.get("precision"),
            "precision_ci": test.get("precision_interval") if current else None,
            "ece": test.get("ece"),
            "ece_ci": test.get("ece_ci"),
        }
    return figures


def review_rows(
    verdicts: Mapping[str, Mapping[str, int]],
    sources: Mapping[str, Mapping[str, int]],
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One row per finding: its reviewed boxes and the share of each verdict (``verdicts``,
    verdict_counts'), its images with ground truth by source (``sources``: evaluate's
    ``ground_truth``, {"nih": n, "review": m}), and release_figures of the previous release
    (``before``, {} for a first release) and of this one (``after``)."""
    rows = []
    for finding in FINDINGS:
        counted = verdicts.get(finding, {})
        reviewed = sum(counted.values())
        rows.append(
            {
                "finding": finding,
                "reviewed": reviewed,
                "shares": {v: counted.get(v, 0) / reviewed for v in VERDICTS} if reviewed else {},
                "ground_truth": {"nih": 0, "review": 0} | dict(sources.get(finding, {})),
                "before": dict(before.get(finding, NO_FIGURES)) if before else None,
                "after": dict(after.get(finding, NO_FIGURES)),
            }
        )
    return rows
