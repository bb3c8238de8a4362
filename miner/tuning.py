"""What a release uses per finding, chosen on box-val and reported on box-test (issue 11).

For each finding and each method variant a run has (``cam``, ``am-t2`` .. ``am-tT``): the box
rule (miner.rules) with the best box-val score, a confidence calibration fitted on that rule's
box-val boxes (miner.calibration) and its operating point; then the variant with the best
box-val score. The score is Acc at T(IoU) = 0.3 with all boxes plus Acc of rank 1 alone, so
that a rule whose rank 1 is right wins over one that is right only somewhere in its three
boxes; ties go to the earlier candidate (the run's own method and the paper's rule first).
Every figure that describes the choice is box-test's, where nothing was chosen.

``outcomes`` maps variant key -> rule name -> finding -> BoxOutcomes, one per half.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cxr_miner.miner.calibration import (
    HIT_IOU,
    PRECISION_TARGET,
    BoxOutcomes,
    Calibration,
    fit_calibration,
    operating_point,
    pool_reliability,
    pr_curve,
    precision_recall,
    reliability,
)
from cxr_miner.miner.rules import BOX_RULES, PAPER_RULE, rule_by_name

Outcomes = Mapping[str, Mapping[str, Mapping[str, BoxOutcomes]]]


def choice_score(outcomes: BoxOutcomes | None) -> float:
    """Acc (all boxes) + Acc (rank 1) at T(IoU) = 0.3; -inf without a pair to judge by."""
    if outcomes is None or not outcomes.pairs:
        return -math.inf
    return outcomes.acc() + outcomes.acc(rank1_only=True)


def best_rule(by_rule: Mapping[str, Mapping[str, BoxOutcomes]], finding: str) -> str:
    """The rule name (BOX_RULES order breaks ties) with the best box-val score for ``finding``."""
    scores = [choice_score(by_rule.get(rule.name, {}).get(finding)) for rule in BOX_RULES]
    return BOX_RULES[int(np.argmax(scores))].name if max(scores) > -math.inf else PAPER_RULE.name


def figures(outcomes: BoxOutcomes | None, calibration: Calibration, at: float | None, curves: bool) -> dict[str, Any]:
    """Acc, Acc of rank 1, and precision and recall at the operating point ``at`` of one half; with
    ``curves``, its reliability diagram (ECE) and precision-recall curve too."""
    outcomes = outcomes or BoxOutcomes()
    signals, hit, pair = outcomes.arrays()
    confidence = calibration.predict(signals)
    at_point = precision_recall(confidence, hit, pair, outcomes.pairs, at) if at is not None else \
        {"boxes": 0, "precision": math.nan, "recall": 0.0 if outcomes.pairs else math.nan}
    row = {"pairs": outcomes.pairs, "boxes": int(len(hit)), "acc": outcomes.acc(), "acc_rank1": outcomes.acc(rank1_only=True),
           "at_operating_point": at_point}
    if curves:
        row["reliability"] = reliability(confidence, hit)
        row["pr_curve"] = pr_curve(confidence, hit, pair, outcomes.pairs)
    return row


def box_size_priors(truth: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], images: Iterable[str],
                    dims: Mapping[str, tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """finding -> (width, height) of its typical box: the medians over the ground-truth boxes of
    ``images`` (box-val) as fractions of their image's (width, height) in ``dims``; what the
    ``prior``-sized box rules (miner.rules) draw. ``truth``: image id -> finding -> xyxy boxes."""
    fractions: dict[str, list[tuple[float, float]]] = {}
    for image in images:
        if image not in dims:
            continue
        width, height = dims[image]
        for finding, boxes in truth.get(image, {}).items():
            fractions.setdefault(finding, []).extend(((b[2] - b[0]) / width, (b[3] - b[1]) / height) for b in boxes)
    return {f: tuple(float(v) for v in np.median(np.array(sizes), axis=0)) for f, sizes in sorted(fractions.items())}


def tune_variant(val: Outcomes, test: Outcomes, variant: str, finding: str, target: float,
                 box_size: tuple[float, float] | None = None) -> dict[str, Any]:
    """Rule, calibration and operating point of one variant for one finding, with their figures
    (``box_size``: the finding's box-size prior, recorded with a ``prior`` rule).

    A finding without box-val boxes gets the paper's rule and a calibration fitted on the boxes
    of every finding (its ``fitted_on`` says so)."""
    rule = best_rule(val.get(variant, {}), finding)
    mine = val.get(variant, {}).get(rule, {}).get(finding)
    signals, hit, _ = mine.arrays() if mine is not None else (None, np.zeros(0, dtype=bool), None)
    if len(hit):
        fitted_on = finding
    else:
        pooled = [o.arrays() for o in val.get(variant, {}).get(rule, {}).values()]
        signals = np.concatenate([p[0] for p in pooled]) if pooled else np.zeros((0, 5))
        hit = np.concatenate([p[1] for p in pooled]) if pooled else np.zeros(0, dtype=bool)
        fitted_on = "all findings (none of this finding in box-val)"
    calibration = fit_calibration(signals, hit)
    at = operating_point(calibration.predict(signals), hit, target)
    return {
        "rule": rule, "box_size": list(box_size) if box_size and rule_by_name(rule).size == "prior" else None,
        "calibration": calibration.to_dict(), "fitted_on": fitted_on, "operating_point": at,
        "box_val": figures(mine, calibration, at, curves=False),
        "box_test": figures(test.get(variant, {}).get(rule, {}).get(finding), calibration, at, curves=True),
    }


def tune(val: Outcomes, test: Outcomes, variants: Sequence[str], findings: Sequence[str],
         target: float = PRECISION_TARGET, box_sizes: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """The choices of every finding (module doc); ``variants`` in preference order for ties;
    ``box_sizes`` (box_size_priors of box-val) for the ``prior`` rules."""
    box_sizes = box_sizes or {}
    if not variants:
        raise ValueError("nothing to tune: no method variant")
    chosen: dict[str, Any] = {}
    for finding in findings:
        candidates = {v: tune_variant(val, test, v, finding, target, box_sizes.get(finding)) for v in variants}
        scores = [choice_score(val.get(v, {}).get(candidates[v]["rule"], {}).get(finding)) for v in variants]
        chosen[finding] = {"method": variants[int(np.argmax(scores))], "candidates": candidates}
    return {"hit_iou": HIT_IOU, "precision_target": target, "chosen_on": "box-val", "reported_on": "box-test",
            "variants": list(variants), "findings": chosen}


def released_figures(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Box-test Acc at T(IoU) = 0.3 of the boxes released per finding (``entries``: finding -> its
    tuned candidate, as in tuning.json), all boxes and rank 1, and the means over the findings
    with box-test pairs (the demo's target, issue 11); ``calibration``: the ECE of all those
    findings' box-test boxes pooled (a finding's own halves are often too small to show it)."""
    rows = {}
    for finding, entry in entries.items():
        test = entry["box_test"]
        if test["pairs"]:
            rows[finding] = {"acc": test["acc"], "acc_rank1": test["acc_rank1"], "pairs": test["pairs"]}
    mean = {k: float(np.mean([r[k] for r in rows.values()])) if rows else math.nan for k in ("acc", "acc_rank1")}
    pooled = pool_reliability(entries[f]["box_test"]["reliability"] for f in rows)
    return {"split": "box-test", "hit_iou": HIT_IOU, "findings": rows, "mean_acc": mean["acc"],
            "mean_acc_rank1": mean["acc_rank1"], "min_acc": min((r["acc"] for r in rows.values()), default=math.nan),
            "calibration": {"boxes": pooled["boxes"], "ece": pooled["ece"]}}


def chosen_entries(tuning: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """finding -> the tuned candidate of the variant chosen for it."""
    return {f: c["candidates"][c["method"]] for f, c in tuning["findings"].items()}
