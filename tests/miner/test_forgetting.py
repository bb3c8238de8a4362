"""AM's forgetting: each step's validation AUC per finding against step 1's, by hand."""

from __future__ import annotations

import math

import pytest

from cxr_miner.miner.forgetting import forgetting_report


def test_a_drop_of_more_than_the_tolerance_is_named_per_step():
    aucs = {"step1": {"Mass": 0.91, "Nodule": 0.80, "Hernia": math.nan},
            "step2": {"Mass": 0.79, "Nodule": 0.79, "Hernia": 0.6},
            "step3": {"Mass": 0.90, "Nodule": 0.77, "Hernia": None}}
    report = forgetting_report(aucs)
    assert report["steps"]["step2"]["changes"]["Mass"] == {"step1": 0.91, "now": 0.79, "change": pytest.approx(-0.12)}
    assert report["steps"]["step2"]["forgotten"] == ["Mass"]  # Nodule: -0.01, within 0.02
    assert report["steps"]["step3"]["forgotten"] == ["Nodule"]  # -0.03; Hernia undefined, not counted
    assert math.isnan(report["steps"]["step3"]["changes"]["Hernia"]["change"])
    assert report["warnings"] == [
        "step2: Mass validation AUC 0.910 -> 0.790 (-0.120, more than 0.02 below step 1)",
        "step3: Nodule validation AUC 0.800 -> 0.770 (-0.030, more than 0.02 below step 1)",
    ]


def test_steps_are_ordered_by_number_and_a_run_without_step_1_has_none():
    aucs = {"step1": {"Mass": 0.9}, "step10": {"Mass": 0.5}, "step2": {"Mass": 0.9}, "mil": {"Mass": 0.1}}
    assert list(forgetting_report(aucs)["steps"]) == ["step2", "step10"]
    assert forgetting_report({"mil": {"Mass": 0.5}}) == {"tolerance": 0.02, "steps": {}, "warnings": []}
