"""Does attention mining forget? Each AM step's validation AUC per finding against step 1's (issue 23).

Knowledge preservation (Cai et al. 2018, section 2.2) exists so that fine-tuning on erased images
does not cost the classifier what step 1 learnt; a finding whose validation ROC AUC falls by more
than FORGETTING_TOLERANCE from step 1 to a later step is *forgotten* there, and said so.
AUCs are finding -> value, NaN (or None, as metrics.json stores it) where undefined.

How far a change is beyond the val split's own noise: ``change_intervals``, the 90% interval of
the change, paired over a bootstrap of the val images (both models scored on the same draws). On
a split of 80 images with 8 positives of a finding, one positive passing two negatives is 0.025,
and such an interval spans about 0.1 (BENCHMARKS.md, issue 23); a line says when it holds 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from cxr_miner.miner.bootstrap import interval, resample_draws

FORGETTING_TOLERANCE = 0.02


def _value(auc: float | None) -> float:
    return math.nan if auc is None else float(auc)


def auc_against_step1(
    step1: Mapping[str, float | None], step: Mapping[str, float | None]
) -> dict[str, dict[str, float]]:
    """finding -> {step1, now, change}: change = now - step1 (NaN where either is undefined)."""
    return {
        f: {
            "step1": _value(step1.get(f)),
            "now": _value(step.get(f)),
            "change": _value(step.get(f)) - _value(step1.get(f)),
        }
        for f in step1
    }


def forgotten(changes: Mapping[str, Mapping[str, float]], tolerance: float = FORGETTING_TOLERANCE) -> list[str]:
    """The findings whose AUC fell by more than ``tolerance`` (undefined changes are not counted)."""
    return [f for f, c in changes.items() if not math.isnan(c["change"]) and c["change"] < -tolerance]


def change_intervals(
    step1_scores: np.ndarray,
    step_scores: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    draws: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """finding -> [low, high]: the 90% interval (miner.bootstrap's LEVEL) of step t's validation
    AUC minus step 1's, both computed on each resample of the val images. Scores (N, C) of the two
    models on the same N images, labels (N, C) bool, C = len(findings); ``draws`` (resamples, N)
    default resample_draws(N). NaN bounds where no resample has both classes."""
    labels = np.asarray(labels, dtype=bool)
    draws = resample_draws(len(labels)) if draws is None else draws
    return {
        finding: list(
            interval(
                resampled_aucs(step_scores[:, c], labels[:, c], draws)
                - resampled_aucs(step1_scores[:, c], labels[:, c], draws)
            )
        )
        for c, finding in enumerate(findings)
    }


def resampled_aucs(scores: np.ndarray, labels: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(resamples,): miner.metrics.roc_auc of ``scores`` (N,) against ``labels`` (N,) bool on each
    row of ``draws`` (resamples, N), all rows ranked at once; NaN where a draw lacks a class."""
    drawn, positive = np.asarray(scores, dtype=np.float64)[draws], np.asarray(labels, dtype=bool)[draws]
    ranks = rankdata(drawn, axis=1)
    positives = positive.sum(axis=1).astype(np.float64)
    negatives = positive.shape[1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = ((ranks * positive).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), aucs, np.nan)


def forgetting_report(
    aucs: Mapping[str, Mapping[str, float | None]],
    tolerance: float = FORGETTING_TOLERANCE,
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> dict[str, Any]:
    """Over a run's kept models (checkpoint name -> finding -> AUC, ``step1`` among them): per AM
    step ``step<t>``, t >= 2, its changes against step 1 and the findings forgotten there, and
    ``warnings``, one line per forgotten finding and step (forgetting_line). ``intervals``: step ->
    finding -> change_intervals' [low, high], kept in each change as ``interval`` where given."""
    steps: dict[str, dict[str, Any]] = {}
    if "step1" in aucs:
        for name in sorted((n for n in aucs if n.startswith("step") and n != "step1"), key=lambda n: int(n[4:])):
            changes: dict[str, dict[str, Any]] = dict(auc_against_step1(aucs["step1"], aucs[name]))
            for finding, bounds in ((intervals or {}).get(name) or {}).items():
                if finding in changes:
                    changes[finding]["interval"] = list(bounds)
            steps[name] = {"changes": changes, "forgotten": forgotten(changes, tolerance)}
    warnings = [
        forgetting_line(name, f, step["changes"][f], tolerance)
        for name, step in steps.items()
        for f in step["forgotten"]
    ]
    return {"tolerance": tolerance, "steps": steps, "warnings": warnings}


def forgetting_line(step: str, finding: str, change: Mapping[str, Any], tolerance: float) -> str:
    """e.g. ``step3: Pneumonia validation AUC 0.810 -> 0.500 (-0.310, more than 0.02 below step 1)``,
    with the change's interval where known: ``... (-0.025, 90% interval [-0.096, +0.027], more than
    0.02 below step 1; the interval holds 0: within the val split's noise)``."""
    bounds = change.get("interval") or [math.nan, math.nan]
    known = not any(math.isnan(_value(b)) for b in bounds)
    spread = f", 90% interval [{bounds[0]:+.3f}, {bounds[1]:+.3f}]" if known else ""
    noise = "; the interval holds 0: within the val split's noise" if known and bounds[0] <= 0 <= bounds[1] else ""
    return (
        f"{step}: {finding} validation AUC {change['step1']:.3f} -> {change['now']:.3f} "
        f"({change['change']:+.3f}{spread}, more than {tolerance} below step 1{noise})"
    )
