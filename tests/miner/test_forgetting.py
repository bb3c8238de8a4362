"""AM's forgetting: each step's validation AUC per finding against step 1's, by hand."""

from __future__ import annotations

import math

import pytest

from cxr_miner.miner.forgetting import forgetting_report


def test_a_drop_of_more_than_the_tolerance_is_named_per_step():
    aucs = {
        "step1": {"Mass": 0.91, "Nodule": 0.80, "Hernia": math.nan},
        "step2": {"Mass": 0.79, "Nodule": 0.79, "Hernia": 0.6},
        "step3": {"Mass": 0.90, "Nodule": 0.77, "Hernia": None},
    }
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


def test_the_change_interval_is_paired_over_the_same_draws_by_hand():
    """One finding, 4 val images (2 positives). Step 1 ranks both positives first (AUC 1); step t
    puts a negative above one positive (AUC 0.5). Draws: all four (change -0.5); images 0, 0, 2, 2
    (one positive above one negative for both: 0); 1, 1, 3, 3 (step t's positive 0.1 below its
    negative 0.2, step 1's 0.8 above: -1); only positives (undefined, left out). The 5% and 95%
    quantiles of [-1, -0.5, 0] by linear interpolation: -0.95 and -0.05."""
    import numpy as np

    from cxr_miner.miner.forgetting import change_intervals

    labels = np.array([[1], [1], [0], [0]], dtype=bool)
    step1, step_t = np.array([[0.9], [0.8], [0.1], [0.2]]), np.array([[0.9], [0.1], [0.8], [0.2]])
    draws = np.array([[0, 1, 2, 3], [0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 1]])
    ((low, high),) = change_intervals(step1, step_t, labels, ["Mass"], draws).values()
    assert (low, high) == (pytest.approx(-0.95), pytest.approx(-0.05))
    assert change_intervals(step1, step1, labels, ["Mass"], draws) == {"Mass": [0.0, 0.0]}


def test_a_forgetting_line_says_whether_its_interval_holds_zero():
    aucs = {"step1": {"Mass": 0.90, "Nodule": 0.90}, "step2": {"Mass": 0.85, "Nodule": 0.85}}
    intervals = {"step2": {"Mass": [-0.12, 0.03], "Nodule": [-0.09, -0.01]}}
    report = forgetting_report(aucs, intervals=intervals)
    assert report["steps"]["step2"]["changes"]["Mass"]["interval"] == [-0.12, 0.03]
    assert report["warnings"] == [
        "step2: Mass validation AUC 0.900 -> 0.850 (-0.050, 90% interval [-0.120, +0.030], more than 0.02 below step 1; "
        "the interval holds 0: within the val split's noise)",
        "step2: Nodule validation AUC 0.900 -> 0.850 (-0.050, 90% interval [-0.090, -0.010], more than 0.02 below step 1)",
    ]


def test_resampled_aucs_are_roc_auc_on_each_draw():
    """The all-rows-at-once AUC against miner.metrics.roc_auc draw by draw, ties and one-class draws included."""
    import numpy as np

    from cxr_miner.miner.bootstrap import resample_draws
    from cxr_miner.miner.forgetting import resampled_aucs
    from cxr_miner.miner.metrics import roc_auc

    rng = np.random.default_rng(3)
    scores, labels = rng.integers(0, 5, 12) / 4, rng.random(12) < 0.25  # ties on purpose
    draws = np.vstack([resample_draws(12, 200, seed=1), np.flatnonzero(~labels)[:1].repeat(12)[None]])
    expected = np.array([roc_auc(scores[d], labels[d]) for d in draws])
    got = resampled_aucs(scores, labels, draws)
    assert np.isnan(got[-1]) and np.isnan(expected[-1])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
