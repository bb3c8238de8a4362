"""Does attention mining forget? Each AM step's validation AUC per finding against step 1's (issue 23).

Knowledge preservation (Cai et al. 2018, section 2.2) exists so that fine-tuning on erased images
does not cost the classifier what step 1 learnt; a finding whose validation ROC AUC falls by more
than FORGETTING_TOLERANCE from step 1 to a later step is *forgotten* there, and said so.
AUCs are finding -> value, NaN (or None, as metrics.json stores it) where undefined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

FORGETTING_TOLERANCE = 0.02


def _value(auc: float | None) -> float:
    return math.nan if auc is None else float(auc)


def auc_against_step1(step1: Mapping[str, float | None], step: Mapping[str, float | None]) -> dict[str, dict[str, float]]:
    """finding -> {step1, now, change}: change = now - step1 (NaN where either is undefined)."""
    return {f: {"step1": _value(step1.get(f)), "now": _value(step.get(f)), "change": _value(step.get(f)) - _value(step1.get(f))}
            for f in step1}


def forgotten(changes: Mapping[str, Mapping[str, float]], tolerance: float = FORGETTING_TOLERANCE) -> list[str]:
    """The findings whose AUC fell by more than ``tolerance`` (undefined changes are not counted)."""
    return [f for f, c in changes.items() if not math.isnan(c["change"]) and c["change"] < -tolerance]


def forgetting_report(aucs: Mapping[str, Mapping[str, float | None]], tolerance: float = FORGETTING_TOLERANCE) -> dict[str, Any]:
    """Over a run's kept models (checkpoint name -> finding -> AUC, ``step1`` among them): per AM
    step ``step<t>``, t >= 2, its changes against step 1 and the findings forgotten there, and
    ``warnings``, one line per forgotten finding and step (forgetting_line)."""
    steps = {}
    if "step1" in aucs:
        for name in sorted((n for n in aucs if n.startswith("step") and n != "step1"), key=lambda n: int(n[4:])):
            changes = auc_against_step1(aucs["step1"], aucs[name])
            steps[name] = {"changes": changes, "forgotten": forgotten(changes, tolerance)}
    warnings = [forgetting_line(name, f, step["changes"][f], tolerance) for name, step in steps.items() for f in step["forgotten"]]
    return {"tolerance": tolerance, "steps": steps, "warnings": warnings}


def forgetting_line(step: str, finding: str, change: Mapping[str, float], tolerance: float) -> str:
    """e.g. ``step3: Pneumonia validation AUC 0.810 -> 0.500 (-0.310, more than 0.02 below step 1)``."""
    return (f"{step}: {finding} validation AUC {change['step1']:.3f} -> {change['now']:.3f} "
            f"({change['change']:+.3f}, more than {tolerance} below step 1)")
